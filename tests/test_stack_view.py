"""Classified stacks in the viewer: labels that follow their images and never overlap, the
in-view overlay, and the probabilities plotted along a stack, linked with the slider."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent

from napari_microclf._qt import _layers
from napari_microclf._qt.overlays import OVERLAY, points_name
from napari_microclf._qt.predict import PLOT_NAME
from napari_microclf._qt.stackplot import StackPlot
from napari_microclf.core.sample import make_sample_stack


@pytest.fixture(scope="module")
def bundle(scratch):
    """The session's tiny trained model (three classes, 32 px): mechanics, not accuracy."""
    return scratch.bundle


def _classified(make_napari_viewer, qtbot, docked, bundle, **big_kwargs):
    """A viewer with two stacks of different sizes at the same origin, both classified by
    the Run worker of a docked Predict widget: "big" (7 pages of 48 px) and "small" (4
    pages of 24 px, pixels twice as large)."""
    viewer = make_napari_viewer()
    big, _ = make_sample_stack(n_pages=7, size=48, seed=3)
    small, _ = make_sample_stack(n_pages=4, size=24, seed=4)
    viewer.add_image(big, name="big", **big_kwargs)
    viewer.add_image(small, name="small", scale=(1, 2, 2))
    widget = docked(viewer, "Predict")
    widget.set_bundle(bundle)
    widget.threshold.setValue(0.0)
    widget.choose(["big", "small"])
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180000)
    assert set(widget.results) == {"big", "small"}
    return viewer, widget


def _disjoint(a, b) -> bool:
    (at, al, ab, ar), (bt, bl, bb, br) = a, b
    return ab <= bt or bb <= at or ar <= bl or br <= al


def _drawn_at(viewer, pts) -> np.ndarray:
    """World (y, x) where the label layer anchors its text (every page at the same place)."""
    return np.array([pts.data_to_world(row)[-2:] for row in pts.data])


def test_labels_of_two_stacks_never_overlap_and_follow_their_images(
    make_napari_viewer, qtbot, bundle, docked
):
    viewer, widget = _classified(make_napari_viewer, qtbot, docked, bundle)
    big, small = viewer.layers["big"], viewer.layers["small"]
    for zoom in (0.2, 1.0, 8.0, 40.0):  # text keeps its size on screen, pixels do not
        viewer.scene.camera.zoom = zoom
        boxes = widget.labels.boxes()
        assert set(boxes) == {"big", "small"}
        assert _disjoint(boxes["big"], boxes["small"])
        for name, layer in (("big", big), ("small", small)):
            at = _drawn_at(viewer, viewer.layers[points_name(name)])
            np.testing.assert_allclose(at, np.tile(boxes[name][:2], (len(at), 1)))
            # the label starts on its image's top-left pixel edge, or below it
            top_left = np.asarray(layer.data_to_world([0, -0.5, -0.5]))[-2:]
            assert boxes[name][1] == pytest.approx(top_left[1])
            assert boxes[name][0] >= top_left[0] - 1e-9

    # moved images take their labels along, and still do not overlap
    small.translate = (0, 5, 3)
    boxes = widget.labels.boxes()
    assert _disjoint(boxes["big"], boxes["small"])
    assert boxes["small"][1] == pytest.approx(np.asarray(small.data_to_world([0, -0.5, -0.5]))[-1])

    # hidden with its image; a hidden label leaves its place to the others
    viewer.scene.camera.zoom = 1.0
    small.translate = (0, 0, 0)
    pts_small = viewer.layers["small classes"]
    was = widget.labels.boxes()
    big.visible = False
    assert not viewer.layers["big classes"].visible and pts_small.visible
    assert set(widget.labels.boxes()) == {"small"}
    assert widget.labels.boxes()["small"][0] <= min(was["small"][0], was["big"][0])
    big.visible = True
    assert viewer.layers["big classes"].visible
    assert _disjoint(*widget.labels.boxes().values())

    # renamed with its image: the label layer, its text and the results follow
    small.name = "field 2"
    assert "small classes" not in viewer.layers and "field 2 classes" in viewer.layers
    assert "field 2" in widget.results and "small" not in widget.results
    assert {widget.table.item(r, 0).text() for r in range(widget.table.rowCount())} == {
        "big",
        "field 2",
    }
    pts = viewer.layers["field 2 classes"]
    viewer.dims.set_point(0, 1)
    assert [t.endswith("· field 2") for t in pts._view_text] == [True]
    assert pts.metadata["microclf"]["image_layer"] == "field 2"

    # removed with its image: label layer and results gone, the other label untouched
    n_big = len(viewer.layers["big classes"].data)
    viewer.layers.remove(small)
    assert "field 2 classes" not in viewer.layers and "field 2" not in widget.results
    assert widget.table.rowCount() == n_big
    assert len(viewer.layers["big classes"].data) == n_big
    assert set(widget.labels.boxes()) == {"big"}


def test_overlay_names_the_active_layer_and_the_page_in_view(
    make_napari_viewer, qtbot, bundle, docked
):
    viewer, widget = _classified(make_napari_viewer, qtbot, docked, bundle)
    overlay = viewer.canvas.overlays[OVERLAY]
    assert _layers.unwrapped(widget.labels.overlay) is overlay  # the widget sees a proxy
    big, small = viewer.layers["big"], viewer.layers["small"]

    def expected(name, page):
        pred = widget.results[name][page]
        return f"{name} page {page}: {widget.label(pred)}"

    viewer.layers.selection.active = big
    seen = set()
    for page in (5, 2, 0):
        viewer.dims.set_point(0, page)
        assert overlay.visible and overlay.text.startswith(expected("big", page))
        seen.add(overlay.text)
    assert len(seen) == 3  # the text changed with the slider
    viewer.layers.selection.active = small  # the active layer changes: its page 0
    assert overlay.text.startswith(expected("small", 0))
    viewer.layers.selection.active = viewer.layers["small classes"]  # its label layer
    assert overlay.text.startswith(expected("small", 0))

    # the threshold: below it a page reads "uncertain" (unless unfamiliar)
    widget.threshold.setValue(1.0)
    pred = widget.results["small"][0]
    assert overlay.text.split(": ", 1)[1].split()[0] == (
        "unfamiliar" if pred.unfamiliar else "uncertain"
    )

    # cleared when the classified layer is hidden or an unclassified one is active
    small.visible = False
    assert not overlay.visible and overlay.text == ""
    small.visible = True
    assert overlay.visible
    other = viewer.add_image(np.zeros((32, 32)), name="not classified")
    viewer.layers.selection.active = other
    assert not overlay.visible and overlay.text == ""
    viewer.layers.selection.active = big
    viewer.layers.remove(big)
    assert not overlay.visible


def _click(plot: StackPlot, page: float) -> None:
    """A real mouse click on the plot at ``page`` (x) halfway up."""
    x, y = plot.canvas.ax.transData.transform((page, 0.5))
    MouseEvent("button_press_event", plot.canvas, x, y, button=1)._process()


def test_plot_along_the_stack_is_linked_with_the_slider(make_napari_viewer, qtbot, bundle, docked):
    # the big stack's pages are 2 world units apart, from 10: the slider's world coordinates
    viewer, widget = _classified(
        make_napari_viewer, qtbot, docked, bundle, scale=(2, 1, 1), translate=(10, 0, 0)
    )
    big, small = viewer.layers["big"], viewer.layers["small"]
    plot = widget.plot
    assert isinstance(plot, StackPlot)  # opened by the run, a stack being classified
    assert any(w is plot for w in viewer.window.dock_widgets.values())
    viewer.layers.selection.active = big
    assert plot.layer == "big"
    ax = plot.canvas.ax
    lines = [line for line in ax.get_lines() if line.get_label() in widget.class_names]
    assert [line.get_label() for line in lines] == widget.class_names
    for line in lines:
        np.testing.assert_allclose(
            line.get_ydata(), [p.probabilities[line.get_label()] for p in widget.results["big"]]
        )

    def in_view(layer=big):
        return _layers.flat_page(layer, _layers.page_in_view(viewer, layer))

    # the marker follows the slider
    for page in (4, 1, 6):
        widget.go_to_page("big", page)
        assert in_view() == page and plot.marker_page == page
        assert list(plot.canvas.marker.get_xdata()) == [page, page]
    # a click on the plot moves the slider (the marker with it)
    for page in (3, 0, 5):
        plot.click_page(page)
        assert in_view() == page and plot.marker_page == page
    _click(plot, 2.2)
    assert in_view() == 2 and plot.marker_page == 2

    # the summary counts the labels the pages show
    preds = widget.results["big"]
    counts = Counter(widget.label(p) for p in preds)
    assert plot.summary.startswith(f"big: {len(preds)} pages: ")
    for label, n in counts.items():
        assert f"{n} {label}" in plot.summary
    assert plot.summary.endswith(f"mean confidence {np.mean([p.confidence for p in preds]):.2f}")
    assert sum(
        int(part.split()[0]) for part in plot.summary.split(": ", 2)[2].split(";")[0].split(", ")
    ) == len(preds)

    # the other stack when it becomes active; the slider drives its own pages
    viewer.layers.selection.active = small
    assert plot.layer == "small" and plot.summary.startswith("small: 4 pages: ")
    plot.click_page(3)
    assert in_view(small) == 3 and plot.marker_page == 3

    # closed, then opened again by the button
    viewer.window.remove_dock_widget(plot)
    widget.plot_btn.click()
    assert widget.plot is plot
    assert any(w is plot for w in viewer.window.dock_widgets.values())
    assert PLOT_NAME in viewer.window.dock_widgets
    # a removed stack leaves the plot for a remaining one
    viewer.layers.remove(small)
    assert plot.layer == "big"
