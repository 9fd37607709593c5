"""Label next: the uncertainty ranking, and the loop find -> label with keys -> Retrain ->
accuracy before and after on the same test list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_microclf._qt._session import SESSION
from napari_microclf.core import active
from napari_microclf.core import dataset as ds


@pytest.mark.parametrize("method", active.METHODS)
def test_uncertainty_orders_constructed_cases(method):
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # sure
            [0.40, 0.30, 0.30],  # spread over all three
            [0.80, 0.15, 0.05],  # fairly sure
            [0.50, 0.49, 0.01],
        ]
    )  # torn between two
    u = active.uncertainty(probs, method)
    assert np.all((u >= 0) & (u <= 1 + 1e-9))
    order = active.rank(probs, method=method)
    assert order[-1] == 0 and order[-2] == 2  # the sure ones last
    assert set(order[:2]) == {1, 3}
    if method == "margin":  # the gap between the two likeliest
        assert order[:2] == [3, 1]
    else:  # the spread over all classes
        assert order[:2] == [1, 3]


def test_unfamiliar_pages_go_first_or_last():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.99, 0.01]])
    unfamiliar = [False, True, False, True]
    assert active.rank(probs, unfamiliar, unfamiliar_order="first") == [1, 3, 0, 2]
    assert active.rank(probs, unfamiliar, unfamiliar_order="last") == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="unfamiliar_order"):
        active.rank(probs, unfamiliar, unfamiliar_order="middle")


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    """A model trained with one class starved (4 images), and a pool of new images."""
    from napari_microclf.core.sample import CLASSES, make_sample_dataset
    from napari_microclf.core.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("label_next")
    root = make_sample_dataset(tmp / "ds", n_per_class=16, size=64, seed=0)
    pool = make_sample_dataset(tmp / "pool", n_per_class=10, size=64, seed=7)
    for p in ds.class_files(root, CLASSES[0])[4:]:
        p.unlink()
    model = tmp / "model"
    first = train(
        TrainConfig(
            str(root),
            str(model),
            image_size=64,
            epochs=5,
            learning_rate=1e-3,
            batch_size=16,
            test_split=0.3,
            epoch_views="one",  # 5 short epochs: a model the starved class still fools
        )
    )
    return root, pool, model, first


def test_cli_lists_the_pages_to_label_next(starved, tmp_path, capsys):
    import csv

    from napari_microclf.cli import main

    root, pool, model, _ = starved
    out = tmp_path / "next.csv"
    assert main(["label-next", str(model), str(pool), "--top", "4", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    want = active.label_next(model, [pool], 4, dataset=root)
    assert [(r["file"], int(r["page"])) for r in rows] == [(c.file, c.page) for c in want]
    assert [float(r["uncertainty"]) for r in rows] == pytest.approx(
        [c.uncertainty for c in want], abs=1e-4
    )
    printed = capsys.readouterr().out
    assert "4 page(s) to label next" in printed and Path(want[0].file).name in printed


def test_pages_of_open_layers_are_ranked_and_shown_in_their_own_layers(
    make_napari_viewer, qtbot, starved, docked
):
    import tifffile

    from napari_microclf._qt.label_next import LAYERS

    root, pool, model, _ = starved
    files = sorted(pool.rglob("*.tif"))[:4]
    viewer = make_napari_viewer()
    for f in files:
        viewer.add_image(tifffile.imread(f), name=f.stem + "_" + f.parent.name)
    widget = docked(viewer, "Label next")
    widget.bundle_edit.setText(str(model))
    widget.top.setValue(3)
    assert widget.find(source=LAYERS) is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    names = {lyr.name for lyr in viewer.layers}
    assert len(widget.candidates) == 3 and {c.file for c in widget.candidates} <= names
    assert "Label next" not in names  # the pages are shown where they are
    probs = np.array([list(c.probabilities.values()) for c in widget.candidates])
    assert [c.uncertainty for c in widget.candidates] == pytest.approx(
        list(active.uncertainty(probs)), abs=1e-6
    )
    widget.list.setCurrentRow(2)
    assert viewer.layers.selection.active.name == widget.candidates[2].file


def test_find_label_with_keys_retrain_and_compare_on_the_same_test_list(
    make_napari_viewer, qtbot, starved, docked
):
    """One class starved in training; labelling the 5 pages the model is least sure about in
    a pool of new images, then Retrain, changes the accuracy on the old test list."""
    from napari_microclf._qt.label_next import LAYER
    from napari_microclf.core.evaluate import evaluate

    root, pool, model, first = starved
    test_list = [
        e["key"] for e in __import__("json").loads((model / "split.json").read_text())["test"]
    ]

    SESSION.last_bundle = None
    viewer = make_napari_viewer()
    annotate = docked(viewer, "Annotate")
    annotate.set_dataset(root)
    widget = docked(viewer, "Label next")
    widget.bundle_edit.setText(str(model))
    widget.top.setValue(5)
    assert widget.find(folder=pool) is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    assert len(widget.candidates) == 5 and widget.list.count() == 5
    layer = viewer.layers[LAYER]
    assert layer.data.shape[0] == 5
    assert [o["file"] for o in layer.metadata["microclf"]["origins"]] == [
        c.file for c in widget.candidates
    ]
    # ranked as the core ranks them: unfamiliar first, then the most uncertain
    flags = [c.unfamiliar for c in widget.candidates]
    assert flags == sorted(flags, reverse=True)
    for part in (True, False):
        u = [c.uncertainty for c in widget.candidates if c.unfamiliar == part]
        assert u == sorted(u, reverse=True)

    # label each with Annotate's keys (its true class is its pool folder)
    classes = annotate.classes()
    before = sum(annotate.counts().values())
    for row, c in enumerate(widget.candidates):
        widget.list.setCurrentRow(row)
        assert viewer.layers.selection.active is layer
        annotate.key_pressed(classes.index(Path(c.file).parent.name) + 1)
    assert sum(annotate.counts().values()) == before + 5
    assert widget.labelled == [Path(c.file).parent.name for c in widget.candidates]
    assert "5 of 5 labelled" in widget.retrain_btn.text()

    assert widget.retrain() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300000)
    result = widget.retrained
    assert result is not None and result.before is not None
    assert result.n == len(test_list) > 0
    # the numbers are the old and the new model scored on the old model's list
    assert result.before == pytest.approx(first.report["accuracy"], abs=1e-4)
    again = evaluate(model, lists_from=model / "previous", save=False)
    assert again["accuracy"] == pytest.approx(result.after, abs=1e-4)
    assert result.after != result.before
    assert f"{result.before:.1%} before" in widget.result.text()
    assert SESSION.last_bundle == str(model)
