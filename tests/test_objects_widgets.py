"""Objects in the widgets (issue 23, items 2-3): annotate the cells of a Labels layer by
clicking them and pressing 1-9, and classify every cell of an image with a model of objects,
as napari docks the widgets (a proxy of the viewer) and as a user clicks and types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from napari.utils.notifications import notification_manager
from qtpy.QtCore import QPoint, Qt

from napari_microclf.core.dataset import read_provenance
from napari_microclf.core.objects import CropSpec, cut_crop, dataset_crop_spec, objects_of
from napari_microclf.core.sample import make_field


def _messages() -> list[str]:
    return [str(n.message) for n in notification_manager.records]


def _press(viewer, qtbot, key: str) -> None:
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key)


def _canvas_point(viewer, y: float, x: float) -> QPoint:
    """Where on the canvas widget the world point ``(y, x)`` is shown (2D view)."""
    native = viewer.window._qt_viewer.canvas.native
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    zoom = camera.zoom
    h, w = native.height(), native.width()
    return QPoint(int(round((x - cx) * zoom + w / 2)), int(round((y - cy) * zoom + h / 2)))


def _click(viewer, qtbot, y: float, x: float) -> None:
    """A left click on the canvas where the world point ``(y, x)`` is shown (2D view)."""
    native = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(native, Qt.LeftButton, pos=_canvas_point(viewer, y, x))


@pytest.fixture(scope="module")
def field():
    image, labels, truth = make_field(size=128, n_cells=10, seed=4)
    return image, labels, truth


def _inside(labels: np.ndarray, label: int) -> tuple[int, int]:
    """A pixel well inside object ``label`` (the one farthest from its outline)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(labels == label)
    y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return int(y), int(x)


# -- annotate ------------------------------------------------------------------------------


def test_click_a_cell_press_a_key_undo_and_all_on_page(
    make_napari_viewer, qtbot, tmp_path, docked, field
):
    image, labels, truth = field
    viewer = make_napari_viewer(show=True)
    viewer.add_image(image, name="cells")
    seg = viewer.add_labels(labels, name="cells labels")
    widget = docked(viewer, "Annotate")
    root = tmp_path / "data"
    widget.set_dataset(root)
    for name in ("round", "elongated", "fragmented"):
        widget.add_class(name)
    objects = widget.objects
    assert objects.labels_combo.isEnabled()
    objects.choose_labels("cells labels")
    assert objects.active()
    widget.keys_toggle.setChecked(True)
    viewer.layers.selection.active = seg  # its own 1-6 choose paint modes: ours win

    # click inside a cell, press 1: exactly that object's crop in "elongated"
    label = next(k for k, v in truth.items() if v == "elongated")
    y, x = _inside(labels, label)
    _click(viewer, qtbot, y, x)
    assert objects.selected == (0, label), objects.info.text()
    overlay = viewer.layers["cells labels annotated"]
    assert set(np.unique(overlay.data[labels == label])) == {255}  # selected: white
    assert widget.classes() == ["elongated", "fragmented", "round"]  # keys 1, 2, 3
    _press(viewer, qtbot, "1")
    assert seg.mode == "pan_zoom", _messages()
    assert list((root / "elongated").glob("*.tif")), _messages()
    (file,) = (root / "elongated").glob("*.tif")
    info = next(o for o in objects_of(labels) if o.label == label)
    np.testing.assert_array_equal(tifffile.imread(file), cut_crop(image, labels, info, CropSpec()))
    prov = read_provenance(file)
    assert (prov["label"], prov["labels"], prov["source"]) == (label, "cells labels", "cells")
    assert widget.counts() == {"elongated": 1, "fragmented": 0, "round": 0}
    # coloured in the class's colour, the other objects and the user's labels untouched
    assert set(np.unique(overlay.data[labels == label])) == {1}
    assert not overlay.data[labels != label].any()
    assert np.array_equal(viewer.layers["cells labels"].data, labels)
    colour = overlay.colormap.map(np.array([1]))[0]
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_microclf._qt.annotate_objects import class_colour

    np.testing.assert_allclose(colour, transform_color(class_colour(0))[0])
    assert dataset_crop_spec(root) == CropSpec()  # the dataset records its crop settings
    assert not objects.crop_box.isEnabled()  # ... and the settings are locked to it

    # a click on the background selects nothing and a key then adds nothing
    _click(viewer, qtbot, *np.argwhere(labels == 0)[0])
    assert objects.selected is None
    _press(viewer, qtbot, "3")
    assert widget.counts()["round"] == 0

    # undo: the file goes to the trash and the colour with it
    widget.undo()
    assert not file.exists() and (root / ".trash" / "elongated" / file.name).exists()
    assert not overlay.data.any()
    assert widget.counts()["elongated"] == 0

    # all objects on this page as the selected class
    widget.select_class("round")
    assert "'round'" in objects.all_btn.text()
    worker = objects.add_page()
    with qtbot.waitSignal(worker.finished, timeout=30000):
        pass
    assert widget.counts() == {"elongated": 0, "fragmented": 0, "round": len(truth)}
    assert sorted(read_provenance(f)["label"] for f in (root / "round").glob("*.tif")) == sorted(
        truth
    )
    assert set(np.unique(overlay.data[labels > 0])) == {3}
    widget.keys_toggle.setChecked(False)


# -- predict -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects_model(tmp_path_factory):
    """A tiny model of objects, trained once on the cells of 4 small synthetic fields."""
    from napari_microclf.core.objects import add_objects
    from napari_microclf.core.sample import write_sample_fields
    from napari_microclf.core.train import TrainConfig, train

    root = tmp_path_factory.mktemp("objects-model")
    fields = write_sample_fields(root / "fields", n_fields=4, size=160, n_cells=14, seed=3)
    data = root / "data"
    for f in fields:
        add_objects(data, f["image"], f["labels"], {(0, k): v for k, v in f["truth"].items()})
    config = TrainConfig(str(data), str(root / "model"), image_size=64, epochs=30, seed=0)
    return train(config).bundle


def _predicted(viewer, qtbot, docked, model, field):
    image, labels, _ = field
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = docked(viewer, "Predict")
    widget.set_bundle(model)
    widget.choose(["cells"])
    worker = widget.run()
    assert worker is not None, _messages()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    return widget


def test_predicted_objects_colours_table_csv_and_rows(
    make_napari_viewer, qtbot, tmp_path, docked, field, objects_model
):
    import csv

    from napari.utils.colormaps.standardize_color import transform_color

    from napari_microclf._qt.annotate_objects import class_colour

    image, labels, truth = field
    viewer = make_napari_viewer(show=True)
    widget = _predicted(viewer, qtbot, docked, objects_model, field)
    assert "'cells' with 'cells labels'" in widget.status.text()
    layer = viewer.layers["cells classes"]
    feats = layer.features
    assert list(feats["label"]) == sorted(truth)  # one row per object, in label order
    right = sum(c == truth[k] for k, c in zip(feats["label"], feats["class"], strict=True))
    print(f"objects right in the widget: {right} of {len(truth)}")
    # each object is its own value, coloured by its class (gray below the threshold)
    names = widget.class_names
    for value, label, cls in zip(feats["index"], feats["label"], feats["class"], strict=True):
        assert set(np.unique(layer.data[labels == label])) == {value}
        want = class_colour(names.index(cls)) if cls in names else "#7a7a7a"
        np.testing.assert_allclose(
            layer.colormap.map(np.array([value]))[0], transform_color(want)[0], atol=1e-6
        )
    assert not layer.data[labels == 0].any()
    assert np.array_equal(viewer.layers["cells labels"].data, labels)  # the user's: untouched
    for c in names:
        assert c in widget.objects.legend.text()

    # the table shows the features, and Export CSV writes the table
    table = widget.table
    header = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    rows = [
        [table.item(r, c).text() for c in range(table.columnCount())]
        for r in range(table.rowCount())
    ]
    assert header[:4] == ["layer", "page", "label", "class"]
    assert len(rows) == len(feats)
    for row, (_, f) in zip(rows, feats.iterrows(), strict=True):
        cells = dict(zip(header, row, strict=True))
        assert (cells["layer"], int(cells["label"]), cells["class"]) == (
            "cells",
            f["label"],
            f["class"],
        )
        for col in ("confidence", *(f"p_{c}" for c in names), "centroid_y", "centroid_x"):
            assert float(cells[col]) == pytest.approx(f[col], abs=1e-4)
        assert int(cells["area"]) == f["area"] == (labels == f["label"]).sum()
    out = widget.export_csv(tmp_path / "objects.csv")
    with out.open(newline="") as fh:
        written = list(csv.reader(fh))
    assert written[0] == ["file", *header[1:]]
    assert written[1:] == rows

    # clicking a row shows that object: the view centred on it, selected in the layer
    row = len(rows) // 2
    label = int(rows[row][2])
    rect = table.visualItemRect(table.item(row, 1))
    qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=rect.center())
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    ys, xs = np.nonzero(labels == label)
    np.testing.assert_allclose(camera.center[-2:], (ys.mean(), xs.mean()), atol=0.1)
    assert layer.selected_label == label
    assert viewer.layers.selection.active.name == "cells classes"

    # a threshold above every confidence: every object uncertain, gray
    widget.threshold.setValue(1.0)
    assert set(layer.features["class"]) == {"uncertain"}
    assert table.item(0, 3).text() == "uncertain"

    # the image renamed: its classes layer, its rows and its CSV follow
    viewer.layers["cells"].name = "field 7"
    assert "field 7 classes" in viewer.layers and "cells classes" not in viewer.layers
    assert {table.item(r, 0).text() for r in range(table.rowCount())} == {"field 7"}
    out = widget.export_csv(tmp_path / "renamed.csv")
    with out.open(newline="") as fh:
        assert {r[0] for r in list(csv.reader(fh))[1:]} == {"field 7"}


def test_the_wrong_kind_of_model_is_said_in_one_line(
    make_napari_viewer, qtbot, tmp_path, docked, field, objects_model
):
    import json
    import shutil

    image, labels, _ = field
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = docked(viewer, "Predict")
    widget.set_bundle(objects_model)
    widget.choose(["cells"])
    # a model of objects and no Labels layer
    assert widget.run() is None
    said = _messages()[-1]
    assert "classifies objects" in said and "\n" not in said
    # a model of whole images (the same model, its objects record taken away) with labels
    images_model = Path(shutil.copytree(objects_model, tmp_path / "images-model"))
    meta = json.loads((images_model / "microclf.json").read_text())
    del meta["objects"]
    (images_model / "microclf.json").write_text(json.dumps(meta))
    viewer.add_labels(labels, name="cells labels")
    widget.set_bundle(images_model)
    widget.choose_labels("cells labels")
    assert widget.run() is None
    said = _messages()[-1]
    assert "trained on whole images" in said and "'cells labels'" in said and "\n" not in said
    assert "cells classes" not in viewer.layers


def test_objects_of_a_stack_keep_their_page(
    make_napari_viewer, qtbot, tmp_path, docked, field, objects_model
):
    image, labels, truth = field
    stack, seg = np.stack([image, image[:, ::-1]]), np.stack([labels, labels[:, ::-1]])
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack")
    viewer.add_labels(seg, name="stack labels")
    # annotate: object 3 of page 1, its crop cut from page 1
    annotate = docked(viewer, "Annotate")
    annotate.set_dataset(tmp_path / "data")
    annotate.add_class("round")
    annotate.objects.choose_labels("stack labels")
    viewer.dims.set_current_step(0, 1)
    annotate.objects.select_at((1, *_inside(seg[1], 3)))
    assert annotate.objects.selected == (1, 3)
    result = annotate.objects.add_selected("round")
    prov = read_provenance(result.path)
    assert (prov["page"], prov["label"], prov["source"]) == (1, 3, "stack")
    info = next(o for o in objects_of(seg[1]) if o.label == 3)
    crop = cut_crop(stack[1], seg[1], info, CropSpec())
    np.testing.assert_array_equal(tifffile.imread(result.path), crop)
    overlay = viewer.layers["stack labels annotated"]
    assert overlay.data[1][seg[1] == 3].all() and not overlay.data[0].any()
    # predict: every object of both pages, its own value though labels repeat across pages
    predict = docked(viewer, "Predict")
    predict.set_bundle(objects_model)
    predict.choose(["stack"])
    with qtbot.waitSignal(predict.run().finished, timeout=60000):
        pass
    layer = viewer.layers["stack classes"]
    feats = layer.features
    assert layer.data.shape == seg.shape
    assert list(feats["page"]) == [0] * len(truth) + [1] * len(truth)
    assert len(set(feats["index"])) == len(feats)
    for value, page, label in zip(feats["index"], feats["page"], feats["label"], strict=True):
        assert set(np.unique(layer.data[page][seg[page] == label])) == {value}
    assert "stack page 1:" in predict.objects.legend.text()
    # the stack plot: the objects of each class on each page
    plot = predict.plot
    assert plot is not None and plot.layer == "stack" and plot.canvas.ax.get_ylabel() == "objects"
    lines = {line.get_label(): list(line.get_ydata()) for line in plot.canvas.ax.get_lines()}
    preds = predict.objects.results["stack"]
    for c in predict.class_names:
        want = [sum(p.page == pg and predict.objects.label(p) == c for p in preds) for pg in (0, 1)]
        assert lines[c] == want, c
    assert sum(sum(lines[c]) for c in predict.class_names) <= 2 * len(truth)
    predict.objects.go_to_row(len(truth) + 2)
    assert viewer.dims.current_step[0] == 1
    assert layer.selected_label == feats["index"][len(truth) + 2]


def test_annotate_opens_with_a_remembered_dataset_and_a_labels_layer_open(
    make_napari_viewer, docked, tmp_path
):
    """The demo's start: the dataset of the last session is remembered and a Labels layer is
    open before the dock (the Objects group refreshed before the keys' state existed)."""
    first = docked(make_napari_viewer(), "Annotate")
    first.set_dataset(tmp_path / "data")
    first.add_class("round")
    image, labels, _ = make_field(size=96, n_cells=6, seed=1)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    tabs = docked(viewer, "All")
    assert Path(tabs.annotate.root) == tmp_path / "data"
    assert tabs.annotate.objects.labels_combo.isEnabled()


def test_a_drag_pans_and_selects_no_cell(make_napari_viewer, qtbot, tmp_path, docked, field):
    image, labels, truth = field
    viewer = make_napari_viewer(show=True)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = docked(viewer, "Annotate")
    widget.set_dataset(tmp_path / "data")
    widget.add_class("round")
    widget.objects.choose_labels("cells labels")
    label = next(iter(truth))
    y, x = _inside(labels, label)
    native = viewer.window._qt_viewer.canvas.native
    _click(viewer, qtbot, y, x)
    assert widget.objects.selected == (0, label)
    widget.objects.select(None)
    # press on the cell, move 30 pixels, release: napari's pan, no selection
    start = _canvas_point(viewer, y, x)
    qtbot.mousePress(native, Qt.LeftButton, pos=start)
    qtbot.mouseMove(native, start + QPoint(15, 0))
    qtbot.mouseMove(native, start + QPoint(30, 0))
    qtbot.mouseRelease(native, Qt.LeftButton, pos=start + QPoint(30, 0))
    assert widget.objects.selected is None
