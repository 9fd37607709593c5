"""Annotate widget, from the code review: Undo stays in its dataset, two openings of one file
keep their channels apart, "Add all slices" is linear in time and can be stopped."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
from napari.components import ViewerModel

from napari_microclf._qt import _layers
from napari_microclf._qt.annotate import AnnotateWidget

PLUGIN = "napari-microclf"


def _pages(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 60000, (n, size, size)).astype(np.uint16)


def _widget(qtbot, root):
    """An Annotate widget on a bare ``ViewerModel`` (no window: for its logic alone)."""
    viewer = ViewerModel()
    widget = AnnotateWidget(viewer, root)
    qtbot.addWidget(widget)
    return viewer, widget


def _docked(docked, viewer, root):
    """The Annotate widget as napari docks it (given a proxy of ``viewer``), on ``root``."""
    widget = docked(viewer, "Annotate")
    widget.set_dataset(root)
    return widget


def _examples(root):
    return sorted(p for p in root.rglob("*.tif") if ".trash" not in p.parts)


# -- Undo ---------------------------------------------------------------------------------


def test_undo_never_crosses_datasets(qtbot, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    viewer, widget = _widget(qtbot, a)
    layer = viewer.add_image(_pages(4), name="stack")
    widget.add_class("x")
    for page in (0, 1):
        viewer.dims.set_current_step(0, page)
        assert widget.add_slice("x", layer).written
    a_files = _examples(a)
    assert len(a_files) == 2 and widget.undo_btn.isEnabled()

    # another dataset: Undo has nothing to do there, and A is left alone
    widget.set_dataset(b)
    assert not widget.undo_btn.isEnabled()
    assert "Undo acts on the dataset shown only" in widget.undo_btn.toolTip()
    assert widget.undo() is None
    assert _examples(a) == a_files and not (b / ".trash").exists()

    # B's own examples are undone inside B
    widget.add_class("y")
    viewer.dims.set_current_step(0, 2)
    b_file = widget.add_slice("y", layer).path
    assert widget.undo_btn.toolTip().startswith(f"Move {b_file.name}")
    moved = widget.undo()
    assert moved == b / ".trash" / "y" / b_file.name and _examples(a) == a_files

    # back in A (spelled differently): its history is there again, undone inside A
    widget.set_dataset(str(tmp_path / "B" / ".." / "A"))
    assert widget.undo_btn.isEnabled()
    moved = widget.undo()
    assert moved.resolve() == a / ".trash" / "x" / a_files[1].name
    assert _examples(a) == a_files[:1] and widget.counts() == {"x": 1}


# -- channel layers of two openings --------------------------------------------------------


def test_same_file_opened_twice_keeps_its_channel_layers_apart(
    make_napari_viewer, tmp_path, docked
):
    data = _pages(6, 20).reshape(3, 2, 20, 20)  # Z, C, Y, X
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZCYX"})
    viewer = make_napari_viewer()
    first = viewer.open(str(path), plugin=PLUGIN)
    second = viewer.open(str(path), plugin=PLUGIN)
    assert len(first) == len(second) == 2 and len(viewer.layers) == 4
    # the first opening's pixels changed: anything mixed in from it would show
    first[0].data = np.zeros_like(np.asarray(first[0].data))

    assert _layers.channel_group(viewer, first[1]) == list(first)
    assert _layers.channel_group(viewer, second[0]) == list(second)
    # a duplicated layer (same metadata) does not add a channel either
    dup = viewer.add_image(
        np.asarray(second[0].data),
        name="copy",
        metadata={"microclf": dict(second[0].metadata["microclf"])},
    )
    assert _layers.channel_group(viewer, second[1]) == list(second)
    assert _layers.channel_group(viewer, dup) == [dup, second[1]]

    widget = _docked(docked, viewer, tmp_path / "ds")
    widget.add_class("x")
    viewer.dims.set_current_step(0, 1)
    result = widget.add_slice("x", second[1])
    saved = tifffile.imread(result.path)
    assert saved.shape == (2, 20, 20)
    np.testing.assert_array_equal(saved, data[1])


def test_another_readers_channel_layers_are_saved_together_as_docked(
    make_napari_viewer, tmp_path, docked
):
    """The layer the docked widget picks is a proxy (a new one at each access): its channel
    group (napari's reader, ``channel_axis``) is found all the same, and both channels saved."""
    data = _pages(6, 20).reshape(3, 2, 20, 20)  # Z, C, Y, X
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, data)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari", channel_axis=1)
    assert len(layers) == 2 and not layers[0].metadata
    widget = _docked(docked, viewer, tmp_path / "ds")
    widget.add_class("x")
    viewer.layers.selection.active = layers[1]
    widget.layer_combo.setCurrentText(layers[1].name)
    assert "2 channels saved together" in widget.layer_info.text()
    viewer.dims.set_current_step(0, 2)
    result = widget.add_slice("x")  # the picked layer, as the Add button does
    saved = tifffile.imread(result.path)
    assert saved.shape == (2, 20, 20)
    np.testing.assert_array_equal(saved, data[2])


# -- Add all slices -------------------------------------------------------------------------


def _add_all(qtbot, widget, layer, stop_after=None, how="button"):
    """Run "Add all slices" on ``layer`` (None: the picked one, as the button does); returns
    (pages done, pages written, seconds)."""
    results = []

    def step(result):
        results.append(result)
        if len(results) == stop_after:
            if how == "button":
                widget.add_all_btn.click()
            else:  # Cancel in napari's activity dock
                widget._pbar.cancel()

    widget.added.connect(step)
    t0 = time.perf_counter()
    worker = widget.add_all_slices("x", layer)
    assert widget.add_all_btn.text() == widget.STOP_ADDING
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    widget.added.disconnect(step)
    return len(results), sum(r.written for r in results), time.perf_counter() - t0


def test_add_all_slices_is_linear_in_the_number_of_pages(qtbot, tmp_path, monkeypatch):
    # folder scans are counted: each page must cost none (one index is made per run)
    from napari_microclf.core import dataset as ds

    scans = []

    def counting(name, fn):
        def counted(*args, **kwargs):
            scans.append(name)
            return fn(*args, **kwargs)

        return counted

    for name in ("find_by_hash", "class_counts", "list_classes", "class_files"):
        monkeypatch.setattr(ds, name, counting(name, getattr(ds, name)))

    times, scan_counts = {100: [], 400: []}, {}
    _add_all(qtbot, *_setup(qtbot, tmp_path / "warm-up", 20))  # imports, the first thread
    for rep in range(3):  # interleaved, the best of three: the CPU is shared
        for n in (100, 400):
            widget, layer = _setup(qtbot, tmp_path / f"ds{n}-{rep}", n)
            scans.clear()
            done, written, elapsed = _add_all(qtbot, widget, layer)
            scan_counts[n] = len(scans)
            assert done == written == n and widget.counts() == {"x": n}
            assert len(_examples(tmp_path / f"ds{n}-{rep}")) == n
            times[n].append(elapsed / n)
    per_page = {n: min(t) for n, t in times.items()}
    ratio = per_page[400] / per_page[100]
    print(
        f"add all: {per_page[100] * 1e3:.2f} ms/page at 100 pages, {per_page[400] * 1e3:.2f} "
        f"ms/page at 400 (ratio {ratio:.2f}); folder scans per run: {scan_counts}"
    )
    assert scan_counts[400] == scan_counts[100]  # a constant, not one per page
    assert ratio < 2.0


def _setup(qtbot, root, n):
    viewer, widget = _widget(qtbot, root)
    widget.add_class("x")
    return widget, viewer.add_image(_pages(n, seed=n), name="stack")


@pytest.mark.parametrize("how", ["button", "activity dock"])
def test_stopping_add_all_keeps_exactly_what_was_written(
    make_napari_viewer, qtbot, tmp_path, how, docked
):
    root = tmp_path / "ds"
    viewer = make_napari_viewer()
    widget = _docked(docked, viewer, root)
    widget.add_class("x")
    n = 300
    layer = viewer.add_image(_pages(n), name="stack")
    assert widget.layer().name == "stack"  # picked: the widget's own (proxy) of it
    done, written, _ = _add_all(qtbot, widget, None, stop_after=25, how=how)
    assert 25 <= written == done < n
    files = _examples(root)
    assert len(files) == written == widget.counts()["x"] == len(widget.history)
    assert sorted(widget.history) == files
    assert not list(root.rglob(".tmp-*")) and not list(root.rglob("*.tmp"))
    for f in files:  # every file whole
        page = int(f.name.split("_p")[1][:4])
        np.testing.assert_array_equal(tifffile.imread(f), layer.data[page])
    assert f"Stopped after {written} of {n} slices" in widget.status.text()
    assert widget.add_all_btn.text() == widget.ADD_ALL and widget.add_all_btn.isEnabled()

    # run again: the pages already saved are recognised, the rest written
    done, more, _ = _add_all(qtbot, widget, None)
    assert done == n and more == n - written
    assert len(_examples(root)) == n == widget.counts()["x"]
