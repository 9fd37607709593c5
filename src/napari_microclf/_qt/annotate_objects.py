"""Annotate objects: click a cell of a Labels layer, press 1-9, and its crop is an example.

:class:`ObjectAnnotator` is the Annotate widget's "Objects" group. With an image layer and
a Labels layer of its shape (one label page per image page, or one for all pages) chosen, a
click on the canvas selects the object under the mouse on the page in view, and the keys
1-9 (or **Add selected object**) put its crop into that class through
:func:`core.objects.add_objects`; **All objects on this page** puts every object of the page
in view into the selected class, in a worker. The crop settings are the dataset's once it
has objects (``objects.json``), else the group's.

Annotated objects are drawn in their class colour by an overlay Labels layer
``"<labels> annotated"`` over the user's Labels layer, whose data stay untouched; the
selected object is white there. Undo (the Annotate widget's) takes an object's colour away
with its file.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
)

from ..core.dataset import hash_index
from ..core.errors import MicroclfError
from ..core.objects import MASKS, SIZES, CropSpec, add_objects, dataset_crop_spec, objects_of
from . import _layers
from ._notify import notify as _notify
from ._worker import stoppable_progress, surfaced
from .stackplot import COLOURS

NONE = "(none: whole slices)"
SELECTED = 255  # the overlay's value of the selected object (white)
SELECTED_COLOUR = "#ffffff"
CHUNK = 64  # objects per add_objects call of "All objects on this page"
CLICK_PX = 4  # a press that moves further (canvas pixels) is a pan, not a click


def class_colour(i: int) -> str:
    """The colour of the ``i``-th class (0-based), as Predict's plot and labels draw it."""
    return COLOURS[i % len(COLOURS)]


def overlay_name(labels_name: str) -> str:
    return f"{labels_name} annotated"


class ObjectAnnotator(QGroupBox):
    """The Objects group of the Annotate widget ``owner`` (its dataset, class, history)."""

    def __init__(self, owner):
        super().__init__("Objects: cells of a Labels layer")
        self.owner = owner
        self.viewer = owner.viewer
        self.selected: tuple[int, int] | None = None  # (page, label) clicked
        # per (dataset key, labels layer name): {(page, label): example path}
        self._annotated: dict[tuple, dict[tuple[int, int], Path]] = {}
        self._worker = None
        self._stop = threading.Event()

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip(
            "The segmentation of the image layer: a Labels layer of its shape (one label "
            "page per image page, or one for all). Chosen, a click on a cell selects it and "
            "keys 1-9 put it into that class; none, the keys add whole slices."
        )
        self.labels_combo.currentIndexChanged.connect(lambda *_: self._labels_changed())
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.add_btn = QPushButton("Add selected object")
        self.add_btn.setToolTip("Put the clicked object's crop into the selected class.")
        self.add_btn.clicked.connect(lambda: self.add_selected())
        self.all_btn = QPushButton("All objects on this page")
        self.all_btn.setToolTip(
            "Put every object of the page in view into the selected class (in the "
            "background; the button stops it)."
        )
        self.all_btn.clicked.connect(lambda: self._all_clicked())
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_btn)
        buttons.addWidget(self.all_btn, 1)

        # the crop settings (core.objects.CropSpec), locked to the dataset's once recorded
        default = CropSpec()
        self.size = QComboBox()
        self.size.addItems(SIZES)
        self.size.setToolTip(
            "object: the object's box plus a margin; fixed: a square of 'context' pixels."
        )
        self.margin = QDoubleSpinBox()
        self.margin.setRange(0.0, 5.0)
        self.margin.setSingleStep(0.05)
        self.margin.setValue(default.margin)
        self.margin.setToolTip("Context on each side, a fraction of the object's longer side.")
        self.context = QSpinBox()
        self.context.setRange(8, 4096)
        self.context.setValue(default.context)
        self.context.setToolTip("The crop's side in pixels with size 'fixed'.")
        self.mask = QComboBox()
        self.mask.addItems(MASKS)
        self.mask.setToolTip(
            "none: the neighbourhood as it is; others: the other objects set to zero; "
            "object: everything but the object set to zero."
        )
        self.crop_note = QLabel()
        self.crop_note.setWordWrap(True)
        self.size.currentTextChanged.connect(lambda *_: self._crop_enabled())
        crop = QGroupBox("Crop")
        cf = QFormLayout(crop)
        size_row = QHBoxLayout()
        size_row.addWidget(self.size)
        size_row.addWidget(QLabel("margin"))
        size_row.addWidget(self.margin)
        size_row.addWidget(QLabel("context"))
        size_row.addWidget(self.context)
        cf.addRow("Size", size_row)
        cf.addRow("Mask", self.mask)
        cf.addRow(self.crop_note)
        self.crop_box = crop

        form = QFormLayout(self)
        form.addRow("Labels layer", self.labels_combo)
        form.addRow(self.info)
        form.addRow(buttons)
        form.addRow(crop)

        _layers.unwrapped(self.viewer).mouse_drag_callbacks.append(self._on_click)
        viewer = _layers.unwrapped(self.viewer)
        callback = self._on_click
        self.destroyed.connect(lambda *_: _drop(viewer.mouse_drag_callbacks, callback))
        self.refresh_layers()
        self.refresh_dataset()

    # -- layers ------------------------------------------------------------------------------
    def image(self):
        return self.owner.layer()

    def labels(self):
        """The chosen Labels layer (None: whole slices)."""
        name = self.labels_combo.currentText()
        if name == NONE or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def active(self) -> bool:
        """Objects are annotated (a Labels layer is chosen for the image layer)."""
        return self.labels() is not None and self.image() is not None

    def refresh_layers(self) -> None:
        current = self.labels_combo.currentText()
        names = [lyr.name for lyr in _layers.labels_for(self.viewer, self.image())]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems([NONE, *names])
        if current in names:
            self.labels_combo.setCurrentText(current)
        self.labels_combo.blockSignals(False)
        self.labels_combo.setEnabled(bool(names))
        if current != self.labels_combo.currentText():
            self._labels_changed()
        else:
            self._update_info()

    def choose_labels(self, name: str) -> None:
        self.labels_combo.setCurrentText(name)

    def _labels_changed(self) -> None:
        self.selected = None
        self.redraw()
        self._update_info()
        self.owner.refresh()  # the keys' text and the classes' colours

    def _page(self) -> int:
        image = self.image()
        return _layers.flat_page(image, _layers.page_in_view(self.viewer, image)) or 0

    def _label_page(self, labels, page: int) -> np.ndarray:
        data = labels.data
        image = self.image()
        if data.ndim == 2:
            return np.asarray(data)
        return np.asarray(data[_layers.page_index(image, page)])

    # -- the crop settings ------------------------------------------------------------------
    def spec(self) -> CropSpec:
        return CropSpec(
            size=self.size.currentText(),
            margin=round(self.margin.value(), 4),
            context=int(self.context.value()),
            mask=self.mask.currentText(),
        )

    def refresh_dataset(self) -> None:
        """The dataset's crop settings (locked) or the group's own; the colours again."""
        try:
            recorded = dataset_crop_spec(self.owner.root)
        except MicroclfError as exc:
            recorded = None
            self.crop_note.setText(str(exc))
        if recorded is not None:
            self.size.setCurrentText(recorded.size)
            self.margin.setValue(recorded.margin)
            self.context.setValue(recorded.context)
            self.mask.setCurrentText(recorded.mask)
            self.crop_note.setText(
                f"This dataset's objects are cut as {recorded.describe()} (its objects.json): "
                "every crop of a dataset is cut the same way."
            )
        else:
            self.crop_note.setText(
                "The first object added records these settings in the dataset "
                "(objects.json); the model trained on it cuts its crops so."
            )
        self.crop_box.setEnabled(recorded is None)
        self._crop_enabled()
        self.redraw()
        self._update_info()

    def _crop_enabled(self) -> None:
        fixed = self.size.currentText() == "fixed"
        self.margin.setEnabled(not fixed)
        self.context.setEnabled(fixed)

    # -- selecting ----------------------------------------------------------------------------
    def _on_click(self, _viewer, event):
        """A left click (press and release without moving) selects the cell under it; a
        press that moves on is napari's pan, and selects nothing."""
        if event.type != "mouse_press" or event.button != 1 or not self.active():
            return
        position, start = tuple(event.position), np.asarray(event.pos, float)
        yield
        while event.type == "mouse_move":
            if np.hypot(*(np.asarray(event.pos, float) - start)) > CLICK_PX:
                return  # a pan
            yield
        self.select_at(position)

    def select_at(self, position) -> tuple[int, int] | None:
        """Select the object under world ``position`` on the page in view; None: background
        (the selection is cleared)."""
        labels = self.labels()
        coords = labels.world_to_data(tuple(position)[-labels.ndim :])[-2:]
        page = self._page()
        lab = self._label_page(labels, page)
        y, x = (int(round(float(c))) for c in coords)
        if not (0 <= y < lab.shape[0] and 0 <= x < lab.shape[1]) or not lab[y, x]:
            self.select(None)
            return None
        return self.select(page, int(lab[y, x]))

    def select(self, page: int | None, label: int | None = None):
        """Select object ``label`` of ``page`` (None: nothing selected)."""
        previous = self.selected
        self.selected = None if page is None or not label else (int(page), int(label))
        if previous is not None:
            self._paint([previous])
        if self.selected is not None:
            self._paint([self.selected])
        self._update_info()
        return self.selected

    def _update_info(self) -> None:
        n_labels = self.labels_combo.count() - 1
        if self.image() is None:
            text = "Open an image and its segmentation (a Labels layer) to annotate cells."
        elif not self.active():
            text = (
                "Choose the Labels layer to annotate its cells one by one."
                if n_labels
                else "No Labels layer has this image's shape: open or paint its "
                "segmentation to annotate cells one by one."
            )
        elif self.selected is None:
            text = "Click a cell, then press 1-9 (keys on) or Add selected object."
        else:
            page, label = self.selected
            where = f" on page {page}" if _layers.n_pages(self.image()) > 1 else ""
            done = self._annotations().get(self.selected)
            text = f"Selected: object {label}{where}" + (
                f", in class '{done.parent.name}'" if done is not None else ""
            )
        self.info.setText(text)
        name = self.owner.selected_class()
        self.all_btn.setText(f"All objects on this page as '{name}'" if name else self.ALL)
        self.add_btn.setEnabled(self.selected is not None)
        self.all_btn.setEnabled(self.active())

    ALL, STOP = "All objects on this page", "Stop adding"

    # -- adding ------------------------------------------------------------------------------
    def _sources(self, page: int):
        image, labels = self.image(), self.labels()
        src = _layers.page_source(self.viewer, image)
        multi = src.n_pages > 1
        return {
            "image": src.page(page),
            "labels": self._label_page(labels, page),
            "page": page if multi else None,
            "source": src.source,
            "labels_source": _layers.source_of(labels),
        }

    def add_selected(self, class_name: str | None = None):
        """Put the selected object into ``class_name`` (default: the selected class);
        returns its AddResult (None when refused)."""
        name = self.owner._target_class(class_name)
        if not name:
            return None
        if self.selected is None:
            _notify("warning", "Click a cell first: the object under the mouse is selected.")
            return None
        page, label = self.selected
        try:
            results = add_objects(
                self.owner.root, assign=name, spec=self.spec(), ids=[label], **self._sources(page)
            )
        except (MicroclfError, OSError, ValueError) as exc:
            _notify("error", f"Cannot add the object: {exc}")
            return None
        if not results:
            _notify("warning", f"Object {label} is not on page {page} of the labels.")
            return None
        result = results[0]
        self._remember(page, label, result)
        self.owner._report(result, f"object {label}" + (f" of page {page}" if page else ""))
        self.selected = None
        self._paint([(page, label)])
        self.owner.refresh()
        return result

    def _remember(self, page: int, label: int, result) -> None:
        """An added (or found) object: coloured by its class from now on."""
        self._annotations()[(page, label)] = result.path

    def _all_clicked(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.quit()
        else:
            self.add_page()

    def add_page(self, class_name: str | None = None):
        """Every object of the page in view into the class, in a worker; returns it."""
        from napari.qt.threading import thread_worker

        if self._worker is not None or self.owner._worker is not None:
            _notify("warning", "Examples are being added; stop that first.")
            return None
        name = self.owner._target_class(class_name)
        if not name or not self.active():
            if name:
                _notify("warning", "Choose the image's Labels layer first.")
            return None
        page = self._page()
        sources = self._sources(page)
        ids = [o.label for o in objects_of(sources["labels"], page)]
        if not ids:
            _notify("info", f"Page {page} of the labels has no objects.")
            return None
        root, spec, key = self.owner.root, self.spec(), ds_key(self.owner.root)
        history = self.owner.history
        done = self._annotations()
        stop = self._stop = threading.Event()

        def work():
            index = hash_index(root)  # one scan of the dataset for the whole page
            for i in range(0, len(ids), CHUNK):
                if stop.is_set():
                    return
                chunk = ids[i : i + CHUNK]
                added = add_objects(root, assign=name, spec=spec, ids=chunk, index=index, **sources)
                yield chunk, added

        pbar = stoppable_progress(len(ids), f"Adding the objects of page {page}", stop.set)
        summary = {"written": 0, "duplicate": 0}

        def on_chunk(item):
            chunk, results = item
            for label, result in zip(chunk, results, strict=False):
                done[(page, label)] = result.path
                if result.written:
                    history.append(result.path)
                    summary["written"] += 1
                    self.owner._bump(key, result.class_name)
                else:
                    summary["duplicate"] += 1
            self._paint([(page, label) for label in chunk])
            pbar.update(len(chunk))

        def on_error(exc):
            _notify("error", f"Adding objects stopped: {exc}")

        def on_finished():
            pbar.close()
            self._worker = None
            self.all_btn.setEnabled(True)
            self.owner.refresh()
            text = f"Added {summary['written']} object(s) of page {page} to '{name}'."
            if summary["duplicate"]:
                text += f" {summary['duplicate']} were in the dataset already."
            self.owner._say(text)

        worker = thread_worker(surfaced(work), ignore_errors=True)()
        worker.yielded.connect(on_chunk)
        worker.errored.connect(on_error)
        worker.finished.connect(on_finished)
        self.all_btn.setText(self.STOP)
        self._worker = worker
        worker.start()
        return worker

    def forget(self, path: Path) -> None:
        """An example was undone: its object loses its colour."""
        for done in self._annotated.values():
            for key, p in list(done.items()):
                if p == path:
                    del done[key]
                    self._paint([key])
        self._update_info()

    # -- the overlay ---------------------------------------------------------------------------
    def _annotations(self) -> dict:
        labels = self.labels()
        name = labels.name if labels is not None else None
        return self._annotated.setdefault((ds_key(self.owner.root), name), {})

    def _values(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(self.owner.classes()[: SELECTED - 1])}

    def overlay(self, make: bool = True):
        """The overlay Labels layer of the chosen Labels layer (made when ``make``)."""
        from napari.utils.colormaps import DirectLabelColormap

        labels, image = self.labels(), self.image()
        if labels is None:
            return None
        name = overlay_name(labels.name)
        colours = {None: "transparent", 0: "transparent", SELECTED: SELECTED_COLOUR}
        colours.update({v: class_colour(v - 1) for v in self._values().values()})
        cmap = DirectLabelColormap(color_dict=colours)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.colormap = cmap
            return layer
        if not make:
            return None
        lead = _layers.lead_shape(image)
        shape = lead + tuple(labels.data.shape[-2:])
        active = self.viewer.layers.selection.active
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=name,
            colormap=cmap,
            opacity=0.75,
            scale=image.scale[-len(shape) :],
            translate=image.translate[-len(shape) :],
        )
        layer.metadata["microclf"] = {"annotated_objects_of": labels.name}
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        return layer

    def _paint(self, keys) -> None:
        """Colour the objects ``keys`` ((page, label)) by their class, the selected white,
        the others clear."""
        overlay = self.overlay(make=bool(keys))
        if overlay is None:
            return
        values = self._values()
        annotations = self._annotations()
        labels, image = self.labels(), self.image()
        data = overlay.data
        by_page: dict[int, list[int]] = {}
        for page, label in keys:
            by_page.setdefault(page, []).append(label)
        for page, ids in by_page.items():
            lab = self._label_page(labels, page)
            lut = np.zeros(int(max(lab.max(), *ids)) + 1, np.uint8)
            for label in ids:
                path = annotations.get((page, label))
                value = values.get(path.parent.name, 0) if path is not None else 0
                lut[label] = SELECTED if self.selected == (page, label) else value
            index = _layers.page_index(image, page)
            region = np.isin(lab, ids)
            data[index][region] = lut[lab[region]]
        overlay.refresh()

    def redraw(self) -> None:
        """The whole overlay again (another dataset, labels layer or class list)."""
        overlay = self.overlay(make=bool(self._annotations()) or self.selected is not None)
        if overlay is None:
            return
        overlay.data[...] = 0
        self._paint([*self._annotations(), *([self.selected] if self.selected else [])])
        overlay.refresh()


def ds_key(root) -> Path:
    """One key per dataset folder, however its path is written (Annotate's too)."""
    return Path(root).expanduser().resolve()


def _drop(callbacks: list, callback) -> None:
    if callback in callbacks:
        callbacks.remove(callback)
