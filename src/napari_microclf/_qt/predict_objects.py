"""Predict's objects: every cell of a Labels layer classified by a model of objects.

When Predict's model was trained on object crops (its ``microclf.json`` has ``objects``),
each chosen image layer is paired with a Labels layer of its shape (the one chosen, or the
one the viewer has) and :func:`core.predict_objects.predict_objects` classifies each of its
objects, page by page, in a worker. :class:`ObjectResults` then shows, per image layer,

- a Labels layer ``"<image> classes"`` whose objects are coloured by their class (the
  colours of Predict's plot; uncertain objects, below the threshold, gray; unfamiliar ones
  light gray), one row per object in its ``features`` (``index``: the object's value in this
  layer, its label in the user's layer where labels do not repeat across pages);
- a legend with the counts per class, and per class on the page in view for a stack;
- the same rows in Predict's results table (the CSV's columns, as Export CSV writes them);
  clicking a row shows that object's page, centres the view on it and selects it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHeaderView, QLabel, QTableWidgetItem

from ..core.csv_format import csv_header, csv_row, prob_column
from ..core.errors import MicroclfError, one_line
from ..core.predict_objects import check_model_kind, predict_objects
from ..core.predict_options import DEFAULTS
from ..core.results import ObjectPrediction
from . import _layers
from ._worker import surfaced
from .annotate_objects import class_colour
from .predictor_cache import get_predictor

UNCERTAIN_COLOUR = "#7a7a7a"  # below the confidence threshold
UNFAMILIAR_COLOUR = "#d8d8d8"  # unlike the training images


def classes_name(image: str) -> str:
    """The Labels layer of the predicted classes of image layer ``image``."""
    return f"{image} classes"


@dataclass(frozen=True)
class ObjectJob:
    """An image layer's pages and its labels, safe to hand to a worker: ``labels`` is the
    Labels layer's array, one page per image page or one for all."""

    name: str
    source: _layers.PageSource
    labels: object
    labels_name: str

    def labels_page(self, page: int) -> np.ndarray:
        if self.labels.ndim == 2:
            return np.asarray(self.labels)
        index = tuple(int(i) for i in np.unravel_index(page, self.source.lead))
        return np.asarray(self.labels[index])


@surfaced
def predict_object_layers(
    bundle: str,
    jobs: list[ObjectJob],
    tta: bool = DEFAULTS.tta,
    stop: threading.Event | None = None,
    engine: str = DEFAULTS.engine,
    precision: str = DEFAULTS.precision,
):
    """Worker: yields ``("__model__", class names)``, then ``(layer name, page, [its
    ObjectPredictions])`` page by page; returns one line for our errors (None when done).
    ``stop`` set ends it after the current batch."""
    stop = stop or threading.Event()
    try:
        predictor = get_predictor(bundle, engine, precision)
        check_model_kind(predictor.bundle.meta, bundle, objects=True)
    except MicroclfError as exc:
        return one_line(exc)
    yield ("__model__", predictor.class_names)
    for job in jobs:
        for page in range(job.source.n_pages):
            if stop.is_set():
                return None
            try:
                preds = [
                    replace(p, file=job.name, page=page)
                    for p in predict_objects(
                        predictor,
                        job.source.page(page),
                        job.labels_page(page),
                        tta=tta,
                        should_stop=stop.is_set,
                    )
                ]
            except MicroclfError as exc:
                return f"{job.name} with {job.labels_name}: {one_line(exc)}"
            yield (job.name, page, preds)
    return None


class ObjectResults:
    """The objects' results of Predict (``owner``): layers, legend, table rows, CSV rows."""

    def __init__(self, owner):
        self.owner = owner
        self.viewer = owner.viewer
        self.results: dict[str, list[ObjectPrediction]] = {}  # image layer name -> objects
        self.labels_of: dict[str, str] = {}  # image layer name -> the Labels layer used
        self._named: dict = {}  # image layer (itself, not a proxy) -> its name (renames)
        self.showing = False  # the table shows objects (the last run was of objects)
        self._rows: list[tuple[str, int, ObjectPrediction]] = []  # the table's rows
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setVisible(False)
        self.viewer.layers.events.removed.connect(self._on_removed)
        self.viewer.dims.events.current_step.connect(lambda *_: self.update_legend())

    # -- results -------------------------------------------------------------------------------
    def values(self, name: str) -> np.ndarray:
        """Each object's value in the classes layer: its label where no label repeats
        across pages, else its row number + 1."""
        preds = self.results[name]
        labels = [p.object_label for p in preds]
        if len(set(labels)) == len(labels):
            return np.array(labels, np.int64)
        return np.arange(1, len(preds) + 1, dtype=np.int64)

    def label(self, pred: ObjectPrediction) -> str:
        return pred.label(self.owner.threshold.value())

    def colour(self, label: str) -> str:
        if label == "uncertain":
            return UNCERTAIN_COLOUR
        if label == "unfamiliar":
            return UNFAMILIAR_COLOUR
        names = self.owner.class_names
        return class_colour(names.index(label) if label in names else len(names))

    def features(self, name: str) -> dict:
        """The classes layer's features: one row per object (the CSV's columns)."""
        preds = self.results[name]
        feats = {
            "index": self.values(name),
            "label": [p.object_label for p in preds],
            "page": [p.page for p in preds],
            "class": [self.label(p) for p in preds],
            "confidence": [round(p.confidence, 4) for p in preds],
        }
        for c in self.owner.class_names:
            feats[prob_column(c)] = [round(p.probabilities[c], 4) for p in preds]
        feats["centroid_y"] = [round(p.centroid[0], 1) for p in preds]
        feats["centroid_x"] = [round(p.centroid[1], 1) for p in preds]
        feats["area"] = [p.area for p in preds]
        feats["unfamiliar"] = [
            np.nan if p.unfamiliar_score is None else round(p.unfamiliar_score, 4) for p in preds
        ]
        return feats

    def colormap(self, name: str):
        from napari.utils.colormaps import DirectLabelColormap

        colours = {None: "transparent", 0: "transparent"}
        for value, pred in zip(self.values(name), self.results[name], strict=True):
            colours[int(value)] = self.colour(self.label(pred))
        return DirectLabelColormap(color_dict=colours)

    def show(self, name: str, job: ObjectJob, preds: list[ObjectPrediction]) -> None:
        """The classes Labels layer of image layer ``name`` (made or replaced)."""
        self.drop_pages(name)
        self.results[name] = preds
        self.labels_of[name] = job.labels_name
        image = self.viewer.layers[name]
        values = self.values(name)
        lead = job.source.lead
        first = job.labels_page(0)
        data = np.zeros((*lead, *first.shape), np.int32 if values.max() < 2**31 else np.int64)
        by_page: dict[int, list[int]] = {}
        for i, p in enumerate(preds):
            by_page.setdefault(p.page, []).append(i)
        for page, rows in by_page.items():
            lab = job.labels_page(page)
            lut = np.zeros(int(lab.max()) + 1, data.dtype)
            for i in rows:
                lut[preds[i].object_label] = values[i]
            index = tuple(int(i) for i in np.unravel_index(page, lead)) if lead else ()
            data[index] = lut[lab]
        lname = classes_name(name)
        active = self.viewer.layers.selection.active
        if lname in self.viewer.layers:
            self.viewer.layers.remove(lname)
        layer = self.viewer.add_labels(
            data,
            name=lname,
            features=self.features(name),
            colormap=self.colormap(name),
            opacity=0.7,
            scale=image.scale[-data.ndim :],
            translate=image.translate[-data.ndim :],
            visible=_layers.label_visible(self.viewer, image),
        )
        layer.metadata["microclf"] = {
            "image_layer": name,
            "labels_layer": job.labels_name,
            "class_names": list(self.owner.class_names),
        }
        _layers.follow_visibility(self.viewer, image, layer)
        self._follow_name(image)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    def _follow_name(self, image) -> None:
        """A renamed image takes its objects and its classes layer with it (once per layer,
        tracked by the layer itself: napari hands the widget a new proxy at every access)."""
        image = _layers.unwrapped(image)
        if image not in self._named:
            self._named[image] = image.name
            image.events.name.connect(self._on_rename)

    def _on_rename(self, event) -> None:
        layer = event.source
        old, new = self._named.get(layer), layer.name
        if old is None or old == new:
            return
        self._named[layer] = new
        if old in self.results:
            self.results[new] = [replace(p, file=new) for p in self.results.pop(old)]
            self.labels_of[new] = self.labels_of.pop(old, None)
            _layers.rename_companion(self.viewer, classes_name(old), classes_name(new), new)
            plot = self.owner.plot
            if plot is not None and plot.layer == old:
                plot.layer = new
                plot.refresh()
            if self.showing:
                self.owner._fill_table()
            self.update_legend()

    def drop_pages(self, name: str) -> None:
        """Page results of ``name`` give way to its objects (one "<image> classes" layer)."""
        if self.owner.results.pop(name, None) is not None:
            labels = self.owner.labels
            pts = labels._label_layer(name)
            if pts is not None:
                self.viewer.layers.remove(pts)

    def drop(self, name: str) -> None:
        """The objects of ``name`` give way to its page results."""
        if self.results.pop(name, None) is not None and classes_name(name) in self.viewer.layers:
            self.viewer.layers.remove(classes_name(name))

    def relabel(self) -> None:
        """The threshold changed: classes, colours, legend and table again."""
        for name in self.results:
            lname = classes_name(name)
            if lname in self.viewer.layers:
                layer = self.viewer.layers[lname]
                layer.features = self.features(name)
                layer.colormap = self.colormap(name)
        self.update_legend()

    def _on_removed(self, event) -> None:
        """An image or its classes layer removed: its objects go from the table."""
        name = event.value.name
        image = next((n for n in self.results if name in (n, classes_name(n))), None)
        if image is None:
            return
        self.results.pop(image)
        if classes_name(image) in self.viewer.layers:
            self.viewer.layers.remove(classes_name(image))
        if self.showing:
            self.owner._fill_table()

    # -- the legend ------------------------------------------------------------------------------
    def update_legend(self) -> None:
        if not self.showing or not self.results:
            self.legend.setVisible(False)
            return
        preds = [p for ps in self.results.values() for p in ps]
        counts = Counter(self.label(p) for p in preds)
        order = [*self.owner.class_names, "uncertain", "unfamiliar"]

        def swatch(label: str, n: int) -> str:
            return f'<span style="color:{self.colour(label)}">&#9632;</span> {label} {n}'

        text = f"{len(preds)} objects: " + " &nbsp; ".join(
            swatch(c, counts[c]) for c in order if c in self.owner.class_names or counts[c]
        )
        stacks = [n for n in self.results if _layers.n_pages(self.viewer.layers[n]) > 1]
        active = self.viewer.layers.selection.active
        name = active.name if active is not None and active.name in stacks else None
        name = name or (stacks[0] if stacks else None)
        if name is not None:
            layer = self.viewer.layers[name]
            page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer))
            here = Counter(self.label(p) for p in self.results[name] if p.page == page)
            text += f"<br>{name} page {page}: " + (
                ", ".join(f"{here[c]} {c}" for c in order if here[c]) or "no objects"
            )
        self.legend.setText(text)
        self.legend.setVisible(True)

    # -- the table -----------------------------------------------------------------------------
    def predictions(self) -> list[ObjectPrediction]:
        return [p for ps in self.results.values() for p in ps]

    def _unfamiliar(self) -> bool:
        return any(p.unfamiliar_score is not None for p in self.predictions())

    def header(self) -> list[str]:
        return [
            "layer" if h == "file" else h
            for h in csv_header(
                self.owner.class_names, False, unfamiliar=self._unfamiliar(), objects=True
            )
        ]

    def table_rows(self) -> list[list[str]]:
        """The table's cells: the CSV's rows (the layer name in the file column)."""
        threshold, unfamiliar = self.owner.threshold.value(), self._unfamiliar()
        return [
            [str(c) for c in csv_row(p, self.owner.class_names, threshold, False, unfamiliar, True)]
            for _, _, p in self._rows
        ]

    def fill_table(self) -> None:
        table = self.owner.table
        self._rows = [(name, i, p) for name, ps in self.results.items() for i, p in enumerate(ps)]
        header = self.header()
        table.setColumnCount(len(header))
        table.setHorizontalHeaderLabels(header)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        rows = self.table_rows()
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignCenter)
                table.setItem(r, c, item)
        self.update_legend()

    def go_to_row(self, row: int) -> ObjectPrediction | None:
        """Show the object of table row ``row``: its page, the view centred on it, selected
        in its classes layer (which becomes the active layer)."""
        if not (0 <= row < len(self._rows)):
            return None
        name, i, pred = self._rows[row]
        lname = classes_name(name)
        if name not in self.viewer.layers or lname not in self.viewer.layers:
            return None
        image, layer = self.viewer.layers[name], self.viewer.layers[lname]
        _layers.show_page(self.viewer, image, pred.page)
        index = _layers.page_index(image, pred.page)
        world = image.data_to_world([*index, *pred.centroid])
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = tuple(float(v) for v in world[-2:])
        layer.selected_label = int(self.values(name)[i])
        self.viewer.layers.selection.active = layer
        return pred
