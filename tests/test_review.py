"""Error review: a confusion-matrix cell opens exactly its images; fixing a label moves the
file through the dataset code, keeps the split and updates Annotate's counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_microclf._qt._session import SESSION
from napari_microclf.core import dataset as ds
from napari_microclf.core import review as rv
from napari_microclf.core.images import PageRef
from napari_microclf.core.report import classification_report
from napari_microclf.core.sample import CLASSES, make_sample_dataset


@pytest.fixture
def dataset(tmp_path):
    root = make_sample_dataset(tmp_path / "ds", n_per_class=6, size=32)
    # one two-page stack, so a cell can hold a page other than 0
    stack = np.random.default_rng(1).integers(0, 255, (2, 40, 24), np.uint8)
    tifffile.imwrite(root / CLASSES[0] / "stack.tif", stack)
    ds.update_split(root, val_fraction=0.2, test_fraction=0.4, seed=3)
    return root


def _report(root, seed=0):
    """A report as evaluation writes it, over every page of the dataset's test list, with
    predictions drawn at random (the review does not care how they were made)."""
    split = ds.load_split(root)
    names = ds.list_classes(root)
    refs = []
    for key in split.files("test"):
        path = root / key
        for page in range(2 if path.name == "stack.tif" else 1):
            refs.append(PageRef(path, page, names.index(key.split("/")[0])))
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(names)), len(refs))
    report = classification_report([r.label for r in refs], probs, names, refs)
    report["data"] = str(root)
    return report, refs, probs


def test_a_cell_holds_exactly_its_pages_least_confident_first(dataset):
    report, refs, probs = _report(dataset)
    names = report["class_names"]
    cm = np.array(report["confusion_matrix"])
    total = 0
    for i, true in enumerate(names):
        for j, pred in enumerate(names):
            cell = rv.cell_pages(report, true, pred)
            assert len(cell) == cm[i, j]
            total += len(cell)
            want = {
                (str(r.path), r.page)
                for r, p in zip(refs, probs, strict=True)
                if r.label == i and p.argmax() == j
            }
            assert {(c["file"], c["page"]) for c in cell} == want
            conf = [c["confidence"] for c in cell]
            assert conf == sorted(conf)
    assert total == len(refs)


def test_an_old_report_opens_its_errors_and_says_how_to_list_the_rest(dataset):
    report, _, _ = _report(dataset)
    del report["pages"]
    names = report["class_names"]
    cm = np.array(report["confusion_matrix"])
    i, j = np.argwhere(cm - np.diag(np.diag(cm)) > 0)[0]
    assert len(rv.cell_pages(report, names[i], names[j])) == cm[i, j]
    with pytest.raises(rv.BundleError, match="microclf evaluate"):
        rv.cell_pages(report, names[0], names[0])


def test_moving_a_test_image_keeps_it_test_with_its_group(dataset):
    split = ds.load_split(dataset)
    key = next(k for k in split.files("test") if k.endswith("stack.tif"))
    group, sha1 = split.groups[key], split.sha1[key]
    other = next(c for c in CLASSES if c != key.split("/")[0])
    before = ds.class_counts(dataset)

    dst = rv.relabel_example(dataset, dataset / key, other)

    assert dst == dataset / other / "stack.tif" and dst.is_file()
    assert not (dataset / key).exists()
    split = ds.load_split(dataset)
    new_key = f"{other}/stack.tif"
    assert key not in split.assignments
    assert split.assignments[new_key] == "test"
    assert (split.groups[new_key], split.sha1[new_key]) == (group, sha1)
    # a later training's split update keeps it in test
    split, _ = ds.update_split(dataset, val_fraction=0.2, test_fraction=0.4, seed=3)
    assert split.assignments[new_key] == "test"
    after = ds.class_counts(dataset)
    assert after[other] == before[other] + 1
    assert after[key.split("/")[0]] == before[key.split("/")[0]] - 1


def test_moving_never_overwrites_a_file_of_the_same_name(dataset):
    a = dataset / CLASSES[0] / "sample_000.tif"
    b = dataset / CLASSES[1] / "sample_000.tif"
    assert a.is_file() and b.is_file()
    before = b.read_bytes()
    dst = rv.relabel_example(dataset, a, CLASSES[1])
    assert dst != b and dst.parent == b.parent and dst.is_file()
    assert b.read_bytes() == before
    split = ds.load_split(dataset)
    assert f"{CLASSES[1]}/{dst.name}" in split.assignments


def test_trash_moves_the_file_out_of_the_dataset_and_the_split(dataset):
    key = ds.load_split(dataset).files("train")[0]
    dst = rv.trash_example(dataset, dataset / key)
    assert dst.is_file() and ds.TRASH_DIR in dst.parts
    assert key not in ds.load_split(dataset).assignments
    assert key.split("/")[1] not in [p.name for p in ds.class_files(dataset, key.split("/")[0])]


def test_files_outside_the_dataset_are_refused(dataset, tmp_path):
    outside = tmp_path / "elsewhere.tif"
    tifffile.imwrite(outside, np.zeros((8, 8), np.uint8))
    with pytest.raises(ds.DatasetError, match="not in the dataset"):
        rv.relabel_example(dataset, outside, CLASSES[0])
    with pytest.raises(ds.DatasetError, match="no such file"):
        rv.trash_example(dataset, dataset / CLASSES[0] / "gone.tif")


def test_page_stack_pads_pages_of_different_sizes_and_names_their_origins(dataset):
    entries = [
        {"file": str(dataset / CLASSES[0] / "stack.tif"), "page": 1},
        {"file": str(dataset / CLASSES[1] / "sample_000.tif"), "page": 0},
    ]
    stack = rv.page_stack(entries)
    assert stack.data.shape == (2, 40, 32)
    assert stack.data.min() >= 0 and stack.data.max() <= 1
    assert stack.origins[0] == {
        "file": entries[0]["file"],
        "page": 1,
        "pages": 2,
        "shape": [40, 24],
    }
    assert np.all(stack.data[0, :, 24:] == 0)  # the padding of the narrower page


# -- widgets ---------------------------------------------------------------------------


def _open(widget, qtbot, true, pred):
    worker = widget.open_cell(true, pred)
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)


def test_click_on_a_train_report_cell_opens_its_images_and_a_move_updates_annotate(
    make_napari_viewer, qtbot, dataset, docked
):
    from qtpy.QtCore import QPoint, Qt

    from napari_microclf._qt.review import ReviewWidget

    SESSION.last_bundle = None
    viewer = make_napari_viewer()
    annotate = docked(viewer, "Annotate")
    annotate.set_dataset(dataset)
    train = docked(viewer, "Train")
    report, refs, probs = _report(dataset, seed=5)
    train.show_report(report)
    names = report["class_names"]
    cm = np.array(report["confusion_matrix"])
    i, j = np.argwhere(cm - np.diag(np.diag(cm)) > 0)[0]  # an error cell
    true, pred = names[i], names[j]

    canvas = train.confusion
    canvas.resize(400, 400)
    canvas.draw()
    x, y = canvas.cell_center(true, pred)
    ratio = canvas.device_pixel_ratio if hasattr(canvas, "device_pixel_ratio") else 1
    point = QPoint(int(x / ratio), int((canvas.figure.bbox.height - y) / ratio))
    with qtbot.waitSignal(canvas.cell_clicked, timeout=5000) as blocker:
        qtbot.mouseClick(canvas, Qt.LeftButton, pos=point)
    assert blocker.args == [true, pred]
    review = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, ReviewWidget))
    qtbot.waitUntil(lambda: review.worker is None and review.layer() is not None, timeout=30000)

    layer = review.layer()
    want = [
        (str(r.path), r.page)
        for r, p in zip(refs, probs, strict=True)
        if r.label == i and p.argmax() == j
    ]
    assert layer.data.shape[0] == len(want) == review.list.count()
    assert sorted((o["file"], o["page"]) for o in layer.metadata["microclf"]["origins"]) == sorted(
        want
    )
    pts = viewer.layers[review.points_name(layer.name)]
    assert set(pts.features["true"]) == {true} and set(pts.features["predicted"]) == {pred}
    assert list(pts.features["confidence"]) == sorted(pts.features["confidence"])

    # step through: the list moves the slider, the slider moves the list
    if len(want) > 1:
        review.list.setCurrentRow(1)
        assert viewer.dims.current_step[0] == 1
        viewer.dims.set_current_step(0, 0)
        assert review.list.currentRow() == 0

    # move the first to its predicted class: file, split and Annotate's counts follow
    first = review.entries[0]
    key = f"{true}/{first['file'].rsplit('/', 1)[1]}"
    subset = ds.load_split(dataset).assignments[key]
    counts = dict(annotate.counts())
    dst = review.move_current(pred)
    assert dst is not None and dst.parent.name == pred and dst.is_file()
    assert ds.load_split(dataset).assignments[f"{pred}/{dst.name}"] == subset
    assert annotate.counts()[pred] == counts[pred] + 1
    assert annotate.counts()[true] == counts[true] - 1
    assert pts.features["status"][0].startswith("[moved to")
    assert layer.metadata["microclf"]["origins"][0]["file"] == str(dst)
    if len(want) > 1:
        assert review.list.currentRow() == 1  # on to the next one
        trashed = review.trash_current()
        assert trashed is not None and ds.TRASH_DIR in trashed.parts
        assert annotate.counts()[true] == counts[true] - 2


def test_review_widget_opens_a_diagonal_cell_of_a_model_folder(
    make_napari_viewer, qtbot, dataset, tmp_path, docked
):
    report, refs, probs = _report(dataset, seed=2)
    model = tmp_path / "model"
    model.mkdir()
    (model / "report.json").write_text(json.dumps(report))
    viewer = make_napari_viewer()
    widget = docked(viewer, "Review")
    assert widget.load(bundle=model)
    assert widget.report is not None and widget.data_dir == dataset
    names = report["class_names"]
    cm = np.array(report["confusion_matrix"])
    k = int(np.argmax(np.diag(cm)))
    assert cm[k, k] > 0
    _open(widget, qtbot, names[k], names[k])
    assert widget.layer().data.shape[0] == cm[k, k]
    widget.keep_current()
    assert widget.entries[0]["status"] == "kept"
    assert all(rv.locate(e, dataset) is not None for e in widget.entries)  # nothing moved


def test_an_example_added_from_a_review_stack_is_the_files_own_page(
    make_napari_viewer, dataset, tmp_path, docked
):
    """Annotate adds the original pixels with the original file as provenance, not the
    normalised, padded display page."""
    entries = [
        {"file": str(dataset / CLASSES[0] / "stack.tif"), "page": 1},
        {"file": str(dataset / CLASSES[1] / "sample_001.tif"), "page": 0},
    ]
    stack = rv.page_stack(entries)
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack.data, name="mixed")
    layer.metadata["microclf"] = {"origins": stack.origins}
    other = tmp_path / "other"
    widget = docked(viewer, "Annotate")
    widget.set_dataset(other)
    widget.add_class("picked")
    viewer.dims.set_current_step(0, 0)
    result = widget.add_slice("picked", layer)
    assert result is not None and result.written
    original = tifffile.imread(entries[0]["file"])[1]
    np.testing.assert_array_equal(tifffile.imread(result.path), original)
    prov = ds.read_provenance(result.path)
    assert prov["source"] == entries[0]["file"] and prov["page"] == 1


def test_a_cell_click_in_the_tabbed_dock_uses_its_review_tab(make_napari_viewer, docked):
    from napari_microclf._qt.review import review_dock

    viewer = make_napari_viewer()
    tabs = docked(viewer, "All")
    assert review_dock(viewer) is tabs.review
    assert review_dock(tabs.train.viewer) is tabs.review  # as Train calls it: with its proxy
    assert tabs.currentWidget() is tabs.review
    assert len(viewer.window.dock_widgets) == 1  # no second Review dock
