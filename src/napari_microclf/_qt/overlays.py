"""Predict's results on the canvas: a label layer per classified image and the in-view text.

Per classified image layer :class:`PageLabels` keeps

- a Points layer ``"<layer> classes"`` with one text point per page, at the image's top-left
  corner: napari shows a point only on its own slice, so the label follows the dims slider
  through a stack. A label follows its image: hidden with it, removed with it, renamed with
  it, moved with it. Labels of several images never overlap: each sits at its image's top
  edge or, where another label is there already, one text line lower, the line height taken
  at the current zoom (:meth:`PageLabels.boxes`);
- for the active classified layer, a canvas text overlay (``"<layer> page 3: fragmented
  0.97"``) that stays readable at any zoom and follows the slider and threshold, and the
  same in words in the ``in_view`` line under Predict's buttons.

It reads the Predict widget's results (``owner.results``, layer name -> PagePredictions, and
``owner.label(pred)``, the page's label at the current threshold) and tells it when a
classified image is renamed or removed (``owner.image_renamed(old, new)``,
``owner.image_removed(name)``), as :class:`stackplot.StackPlot` reads them.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QLabel

from ..core.results import PagePrediction
from . import _layers

LABEL_TEXT = "{label} ({confidence:.2f}) · "  # a page's label on the canvas, + layer name
LABEL_SIZE = 12  # its font size
LINE_PX = 2 * LABEL_SIZE  # screen pixels per label line: the text and a gap
CHAR_PX = 0.75 * LABEL_SIZE  # screen pixels per character, generously
OVERLAY = "microclf_in_view"  # key of the text overlay in viewer.canvas.overlays


def points_name(name: str) -> str:
    """The label layer of image layer ``name``."""
    return f"{name} classes"


def label_template(name: str) -> str:
    """The label's napari text template: 'fragmented (0.97) · cells.tif' (the layer's name
    tells the labels of images that lie on each other apart)."""
    return LABEL_TEXT + name.replace("{", "{{").replace("}", "}}")


class PageLabels:
    """The label layers of the classified images, their placement, and the in-view text."""

    def __init__(self, viewer, owner):
        self.viewer = viewer
        self.owner = owner
        self.in_view = QLabel("")
        self.in_view.setWordWrap(True)
        self.in_view.setStyleSheet("font-weight: bold;")
        self._linked: dict = {}  # image layer (the layer itself, not a proxy) -> its name
        self._boxes: dict[str, tuple] = {}  # see boxes
        viewer.layers.events.removed.connect(self._on_removed)
        viewer.dims.events.current_step.connect(self.update_in_view)
        viewer.layers.selection.events.active.connect(self.update_in_view)
        self._camera().events.zoom.connect(self.place)
        _layers.unwrapped(viewer.canvas.grid).events.enabled.connect(self._on_grid)

    # -- the label layers --------------------------------------------------------------------
    def show(self, name: str, preds: list[PagePrediction]) -> None:
        """The text Points layer of image layer ``name``, one point per page: made, or
        updated when it is there already; it follows the image from now on."""
        layer = self.viewer.layers[name]
        coords = np.array([[*_layers.page_index(layer, p.page), 0, 0] for p in preds], float)
        features = {
            "page": [p.page for p in preds],
            "class": [p.class_name for p in preds],
            "confidence": [round(p.confidence, 4) for p in preds],
            "label": [self.owner.label(p) for p in preds],
            "unfamiliar": [
                np.nan if p.unfamiliar_score is None else round(p.unfamiliar_score, 3)
                for p in preds
            ],
        }
        # "lower_left": the text hangs below its point (napari's y axis points down)
        text = {
            "string": label_template(name),
            "anchor": "lower_left",
            "size": LABEL_SIZE,
            "color": "yellow",
        }
        pname = points_name(name)
        active = self.viewer.layers.selection.active
        if pname in self.viewer.layers:
            pts = self.viewer.layers[pname]
            pts.data = coords
            pts.features = features
            pts.text = text
        else:
            pts = self.viewer.add_points(
                coords,
                features=features,
                text=text,
                name=pname,
                size=1,
                face_color="transparent",
                border_width=0,
                scale=layer.scale[-coords.shape[1] :],
                units=layer.units[-coords.shape[1] :],
                translate=layer.translate[-coords.shape[1] :],
                blending="translucent_no_depth",
                visible=_layers.label_visible(self.viewer, layer),
            )
            pts.metadata["microclf"] = {"image_layer": name}
        self._link(layer, name)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active  # keep the image active (keys 1-9)

    def relabel(self) -> None:
        """The labels again at the owner's threshold (the texts, their places, the in-view
        text)."""
        for name, preds in self.owner.results.items():
            pts = self._label_layer(name)
            if pts is not None:
                feats = pts.features.copy()
                feats["label"] = [self.owner.label(p) for p in preds]
                pts.features = feats
                pts.refresh_text()
        self.place()  # the texts' widths changed
        self.update_in_view()

    def _label_layer(self, name: str):
        pname = points_name(name)
        return self.viewer.layers[pname] if pname in self.viewer.layers else None  # noqa: SIM401

    # -- a label follows its image -----------------------------------------------------------
    def _link(self, layer, name: str) -> None:
        """Follow ``layer``'s visibility, name and position with its label (once per layer)."""
        layer = _layers.unwrapped(layer)
        if layer not in self._linked:
            layer.events.visible.connect(self._on_visible)
            layer.events.name.connect(self._on_rename)
            layer.events.scale.connect(self.place)
            layer.events.translate.connect(self.place)
        self._linked[layer] = name

    def _unlink(self, layer) -> str | None:
        layer = _layers.unwrapped(layer)
        name = self._linked.pop(layer, None)
        if name is not None:
            layer.events.visible.disconnect(self._on_visible)
            layer.events.name.disconnect(self._on_rename)
            layer.events.scale.disconnect(self.place)
            layer.events.translate.disconnect(self.place)
        return name

    def _on_visible(self, event) -> None:
        self._show_labels(event.source)
        self.place()
        self.update_in_view()

    def _show_labels(self, layer) -> None:
        name = self._linked.get(layer)
        pts = self._label_layer(name) if name is not None else None
        if pts is not None:
            pts.visible = _layers.label_visible(self.viewer, layer)

    def _on_grid(self, *_) -> None:
        """Grid mode on: the labels hide (napari would give each its own, empty cell); off:
        they are back with their images."""
        for layer in list(self._linked):
            self._show_labels(layer)
        self.place()

    def _on_rename(self, event) -> None:
        """The label layer and (at the owner) the results take the image's new name."""
        layer = event.source
        old, new = self._linked.get(layer), layer.name
        if old is None or old == new:
            return
        self._linked[layer] = new
        _layers.rename_companion(self.viewer, points_name(old), points_name(new), new)
        self.owner.image_renamed(old, new)
        pts = self._label_layer(new)
        if pts is not None:
            pts.text.string = label_template(new)
            pts.refresh_text()
            self.place()  # its width changed
        self.update_in_view()

    def _on_removed(self, event) -> None:
        """A removed image takes its label layer and (at the owner) its results with it."""
        name = self._unlink(event.value)
        if name is not None:
            pts = self._label_layer(name)
            if pts is not None:
                self.viewer.layers.remove(pts)
            self.owner.image_removed(name)
        self.place()
        self.update_in_view()

    # -- where the labels go -----------------------------------------------------------------
    def boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """World ``(top, left, bottom, right)`` of each label on the canvas at the current
        zoom: one text line high, as wide as its longest text (a generous estimate)."""
        return dict(self._boxes)

    def _camera(self):
        """The 2D camera (``viewer.scene.camera``; napari >= 0.9)."""
        return self.viewer.scene.camera

    def place(self, *_) -> None:
        """Each shown label at its image's top-left corner, or lower by whole text lines
        until it overlaps no label placed before it (labels taken top to bottom).

        Text keeps its size on screen, so a line is ``LINE_PX / zoom`` world units high and
        the labels are placed again when the zoom changes.
        """
        zoom = max(float(self._camera().zoom), 1e-12)
        line = LINE_PX / zoom
        entries = []
        for name in self.owner.results:
            pts = self._label_layer(name)
            if pts is None or name not in self.viewer.layers or not len(pts.data):
                continue
            image = self.viewer.layers[name]
            n = pts.data.shape[1]
            if not (
                np.array_equal(pts.scale, image.scale[-n:])
                and np.array_equal(pts.translate, image.translate[-n:])
            ):
                pts.scale, pts.translate = image.scale[-n:], image.translate[-n:]
            (sy, sx), (ty, tx) = pts.scale[-2:], pts.translate[-2:]
            # the pixel edges of the first row and column, not their centres
            top, left = ty - 0.5 * abs(sy), tx - 0.5 * abs(sx)
            chars = max(
                len(label_template(name).format(label=lab, confidence=0.0))
                for lab in pts.features["label"]
            )
            shown = _layers.label_visible(self.viewer, image)
            entries.append((top, left, chars * CHAR_PX / zoom, name, pts, shown))
        placed: list[tuple[float, float, float]] = []  # (top, left, right)
        self._boxes = {}
        for top, left, width, name, pts, shown in sorted(entries, key=lambda e: e[:2]):
            y = top
            if shown:
                moved = True
                while moved:
                    moved = False
                    for p_top, p_left, p_right in placed:
                        if (
                            p_left < left + width
                            and left < p_right
                            and p_top < y + line
                            and y < p_top + line
                        ):
                            y, moved = p_top + line, True
                placed.append((y, left, left + width))
                self._boxes[name] = (y, left, y + line, left + width)
            (sy, sx), (ty, tx) = pts.scale[-2:], pts.translate[-2:]
            yx = np.array([(y - ty) / sy, (left - tx) / sx])
            if not np.allclose(pts.data[:, -2:], yx):
                data = pts.data.copy()
                data[:, -2:] = yx
                pts.data = data

    # -- the page in view ----------------------------------------------------------------------
    def in_view_text(self) -> str:
        """'In view: cells.tif, page 3: fragmented (confidence 0.97)' for the active
        classified layer (else the first one) at the slider's position."""
        results = self.owner.results
        active = self.viewer.layers.selection.active
        name = active.name if active is not None else None
        if name not in results:
            meta = active.metadata.get("microclf", {}) if active is not None else {}
            name = meta.get("image_layer") if isinstance(meta, dict) else None
        if name not in results:
            name = next(iter(results), None)
        if name is None or name not in self.viewer.layers:
            return ""
        layer = self.viewer.layers[name]
        page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer)) or 0
        pred = next((p for p in results[name] if p.page == page), None)
        if pred is None:
            return ""
        where = f", page {page}" if _layers.lead_shape(layer) else ""
        unlike = (
            f", unlike the training images: score {pred.unfamiliar_score:.2f}"
            if pred.unfamiliar
            else ""
        )
        return (
            f"In view: {name}{where}: {self.owner.label(pred)} "
            f"(confidence {pred.confidence:.2f}{unlike})"
        )

    def active_classified(self) -> str | None:
        """The classified image layer that is active (or whose label or heatmap layer is),
        if it is visible; else None."""
        results = self.owner.results
        active = self.viewer.layers.selection.active
        if active is None:
            return None
        name = active.name
        if name not in results:
            meta = active.metadata.get("microclf", {}) if isinstance(active.metadata, dict) else {}
            name = meta.get("image_layer") if isinstance(meta, dict) else None
        if name not in results or name not in self.viewer.layers:
            return None
        return name if self.viewer.layers[name].visible else None

    def overlay_text(self) -> str:
        """'cells.tif page 3: fragmented 0.97' for the active classified layer at the
        slider's position ('' when no classified layer is active and visible)."""
        name = self.active_classified()
        if name is None:
            return ""
        layer = self.viewer.layers[name]
        page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer))
        pred = next((p for p in self.owner.results[name] if p.page == (page or 0)), None)
        if pred is None:
            return ""
        where = f" page {page}" if page is not None else ""
        what = (
            f"unfamiliar (score {pred.unfamiliar_score:.2f})"
            if pred.unfamiliar
            else f"{self.owner.label(pred)} {pred.confidence:.2f}"
        )
        return f"{name}{where}: {what}"

    @property
    def overlay(self):
        """The canvas text overlay (napari's canvas overlays, tiled with the others)."""
        overlays = self.viewer.canvas.overlays  # napari >= 0.9
        if OVERLAY not in overlays:
            from napari.components.overlays import TextOverlay

            overlays[OVERLAY] = TextOverlay(
                visible=False, position="bottom_center", font_size=14, color="yellow", box=True
            )
        return overlays[OVERLAY]

    def update_in_view(self, *_) -> None:
        """The in-view line and the canvas overlay for the page in view now."""
        self.in_view.setText(self.in_view_text())
        text = self.overlay_text()
        overlay = self.overlay
        overlay.text = text
        overlay.visible = bool(text)
