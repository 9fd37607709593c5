"""The Label next widget: the unlabelled pages that would teach the model most, labelled with
Annotate's keys, then one click to retrain and see the test accuracy before and after.

Pages of a folder are ranked by the model's uncertainty (``core.active``), the unfamiliar
ones first or last; the top N open as one stack layer ``Label next`` whose pages name their
files (Annotate adds the file's own page, with the file as provenance). Pages of open image
layers are ranked the same way and the list steps through them in their own layers.
"""

from __future__ import annotations

import threading
from itertools import islice
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core import active
from ..core.errors import MicroclfError
from . import _layers
from ._notify import notify as _notify
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._worker import surfaced
from .predictor_cache import get_predictor

LAYER = "Label next"
FOLDER, LAYERS = "a folder", "the open image layers"


@surfaced
def _rank_folder(bundle: str, folder: str, n: int, method: str, order: str, dataset):
    from ..core.review import page_stack

    yield "ranking"
    cands = active.label_next(get_predictor(bundle), [folder], n, method, order, dataset)
    stack = page_stack([{"file": c.file, "page": c.page} for c in cands]) if cands else None
    return cands, stack


@surfaced
def _rank_layers(bundle: str, sources: list, n: int, method: str, order: str):
    yield "ranking"
    predictor = get_predictor(bundle)
    preds = []
    for src in sources:
        items = ((src.name, p, src.page(p)) for p in range(src.n_pages))
        preds.extend(predictor.predict_pages(items))
    cands = list(islice(active.ranked(preds, predictor.class_names, method, order), n))
    return cands, None


@surfaced
def _retrain_job(bundle: str, stop: threading.Event):
    yield "training"
    return active.retrain(bundle, should_stop=stop.is_set)


class LabelNextWidget(QWidget):
    """Model, where the unlabelled pages are, how to rank; the list; Retrain."""

    def __init__(self, napari_viewer, bundle: str | Path | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.candidates: list[active.Candidate] = []
        self.labelled: list[str | None] = []
        self.mode = FOLDER
        self.worker = None
        self.retrained: active.Retrained | None = None
        self._stop = threading.Event()

        self.bundle_edit = QLineEdit(str(bundle or SESSION.last_bundle or ""))
        self.bundle_edit.setPlaceholderText("model folder")
        connect_widget(SESSION.bundle_trained, self, "_follow_bundle")
        connect_widget(SESSION.dataset_changed, self, "update_labelled")
        connect_widget(SESSION.dataset_edited, self, "update_labelled")
        self.source = QComboBox()
        self.source.addItems([FOLDER, LAYERS])
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder of unlabelled images")
        self.method = QComboBox()
        self.method.addItems(active.METHODS)
        self.method.setToolTip(
            "margin: the two likeliest classes are close; entropy: the "
            "probability is spread over all classes."
        )
        self.order = QComboBox()
        self.order.addItems(["first", "last"])
        self.order.setToolTip(
            "Pages unlike the training images: first (a class the model lacks?) or last (debris?)."
        )
        self.top = QSpinBox()
        self.top.setRange(1, 500)
        self.top.setValue(20)
        self.find_btn = QPushButton("Find pages to label")
        self.find_btn.clicked.connect(lambda: self.find())
        self.list = QListWidget()
        self.list.currentRowChanged.connect(self.go_to)
        self.retrain_btn = QPushButton("Retrain")
        self.retrain_btn.setToolTip(
            "Train this model folder again with its own settings on the "
            "dataset as it is now (a frozen base reuses the feature "
            "cache), then score the old and the new model on the old "
            "model's test list."
        )
        self.retrain_btn.clicked.connect(lambda: self.retrain())
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.result.setStyleSheet("font-weight: bold;")

        form = QFormLayout()
        form.addRow("Model", folder_row(self.bundle_edit, "Model folder", self))
        form.addRow("Rank pages of", self.source)
        form.addRow("Folder", folder_row(self.folder_edit, "Unlabelled images", self))
        form.addRow("Uncertainty", self.method)
        form.addRow("Unfamiliar pages", self.order)
        form.addRow("Show the top", self.top)
        layout = QVBoxLayout(self)
        intro = QLabel(
            "Which pages would teach the model most? Label them with Annotate's "
            "keys 1-9 ('Annotate with keys' on, the 'Label next' layer active; the "
            "slider or the list for the next), then Retrain."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.find_btn)
        layout.addWidget(self.list, 1)
        row = QHBoxLayout()
        row.addWidget(self.retrain_btn)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addWidget(self.result)

    def _follow_bundle(self, path: str) -> None:
        if self.worker is None:  # not the model a running retrain writes
            self.bundle_edit.setText(path)

    def bundle(self) -> str:
        return self.bundle_edit.text().strip()

    def dataset(self) -> Path | None:
        from ..core.bundle import read_meta

        try:
            data = read_meta(self.bundle()).get("data_dir")
        except (MicroclfError, OSError, ValueError):
            return None
        return Path(data) if data else None

    # -- ranking -------------------------------------------------------------------------
    def find(self, folder: str | None = None, source: str | None = None):
        """Rank the pages (in a worker); returns the worker, or None."""
        from napari.qt.threading import thread_worker

        if self.worker is not None:
            _notify("warning", "Label next: wait for the running job.")
            return None
        if folder is not None:
            self.folder_edit.setText(str(folder))
        if source is not None:
            self.source.setCurrentText(source)
        self.mode = self.source.currentText()
        if not self.bundle():
            _notify("warning", "Label next: choose a model folder first.")
            return None
        args = (self.top.value(), self.method.currentText(), self.order.currentText())
        if self.mode == FOLDER:
            folder = self.folder_edit.text().strip()
            if not folder or not Path(folder).is_dir():
                _notify("warning", f"Label next: {folder or 'no folder'} is not a folder.")
                return None
            worker = thread_worker(_rank_folder, ignore_errors=True)(
                self.bundle(), folder, *args, self.dataset()
            )
        else:
            own = (LAYER,)
            sources = [
                _layers.page_source(self.viewer, lyr)
                for lyr in _layers.image_layers(self.viewer)
                if lyr.name not in own
                and "heatmap" not in lyr.metadata.get("microclf", {})
                and not lyr.name.startswith("Review ")
            ]
            if not sources:
                _notify("warning", "Label next: open some images first.")
                return None
            worker = thread_worker(_rank_layers, ignore_errors=True)(self.bundle(), sources, *args)
        worker.returned.connect(self._ranked)
        return self._start(worker, "Classifying and ranking pages...")

    def _start(self, worker, status: str):
        worker.errored.connect(lambda exc: _notify("error", f"Label next: {exc}"))
        worker.finished.connect(self._done)
        self.worker = worker
        self.find_btn.setEnabled(False)
        self.retrain_btn.setEnabled(False)
        self.status.setText(status)
        worker.start()
        return worker

    def _done(self) -> None:
        self.worker = None
        self.find_btn.setEnabled(True)
        self.retrain_btn.setEnabled(True)

    def _ranked(self, result) -> None:
        cands, stack = result
        self.candidates = list(cands)
        if stack is not None:
            self._show_stack(stack)
        self.update_labelled()
        self.status.setText(
            f"{len(cands)} page(s) to label, most uncertain first"
            + (
                f" ({sum(c.unfamiliar for c in cands)} unlike the training images)"
                if any(c.unfamiliar for c in cands)
                else ""
            )
            + "."
            if cands
            else "No pages to label (all in the dataset already, or none readable)."
        )
        if cands:
            self.list.setCurrentRow(0)
            self.go_to(0)  # a new stack layer opens at its middle page

    def _show_stack(self, stack) -> None:
        for name in (f"{LAYER} guesses", LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        layer = self.viewer.add_image(
            stack.data, name=LAYER, rgb=stack.data.ndim == 4, contrast_limits=(0, 1)
        )
        layer.metadata["microclf"] = {"origins": stack.origins, "label_next": True}
        features = {
            "rank": list(range(1, len(self.candidates) + 1)),
            "guess": [c.guess for c in self.candidates],
            "confidence": [c.confidence for c in self.candidates],
            "uncertainty": [c.uncertainty for c in self.candidates],
            "unfamiliar": [" unfamiliar" if c.unfamiliar else "" for c in self.candidates],
            "file": [Path(c.file).name for c in self.candidates],
        }
        # under the image's bottom edge (Review writes above the top edge, Predict inside
        # from the top: the texts of the widgets never overlap)
        bottom = stack.data.shape[1] - 0.5
        pts = self.viewer.add_points(
            np.array([[i, bottom, -0.5] for i in range(len(self.candidates))], float),
            features=features,
            name=f"{LAYER} guesses",
            size=1,
            face_color="transparent",
            border_width=0,
            blending="translucent_no_depth",
            text={
                "string": "#{rank}: model guesses {guess} ({confidence:.2f}){unfamiliar}",
                "anchor": "lower_left",
                "size": 11,
                "color": "cyan",
            },
        )
        pts.metadata["microclf"] = {"image_layer": LAYER}
        _layers.follow_visibility(self.viewer, layer, pts)
        self.viewer.layers.selection.active = layer

    def _row_text(self, i: int) -> str:
        c = self.candidates[i]
        page = f" p{c.page}" if c.page else ""
        flag = " [unfamiliar]" if c.unfamiliar else ""
        done = self.labelled[i] if i < len(self.labelled) else None
        tail = f"  \u2192 labelled {done}" if done else ""
        return (
            f"{i + 1}. {Path(str(c.file)).name}{page}: guess {c.guess} "
            f"({c.confidence:.2f}), uncertainty {c.uncertainty:.2f}{flag}{tail}"
        )

    def update_labelled(self, *_) -> None:
        """Which candidates are in the dataset now (and in which class)."""
        root = self.dataset()
        if not self.candidates:
            return
        from ..core.dataset import hash_index

        index = hash_index(root) if root is not None and root.is_dir() else {}
        self.labelled = []
        for c in self.candidates:
            try:
                self.labelled.append(
                    active.is_labelled(c, index) if index and self.mode == FOLDER else None
                )
            except (MicroclfError, OSError):
                self.labelled.append(None)
        row = self.list.currentRow()
        self.list.blockSignals(True)
        self.list.clear()
        self.list.addItems([self._row_text(i) for i in range(len(self.candidates))])
        self.list.setCurrentRow(max(row, 0))
        self.list.blockSignals(False)
        if self.mode == FOLDER:
            n = sum(bool(x) for x in self.labelled)
            self.retrain_btn.setText(f"Retrain ({n} of {len(self.candidates)} labelled)")

    def go_to(self, row: int) -> None:
        if not 0 <= row < len(self.candidates):
            return
        # folder: row ``row`` of the Label next stack; open layers: the page in its own layer
        name, page = (
            (LAYER, row)
            if self.mode == FOLDER
            else (self.candidates[row].file, self.candidates[row].page)
        )
        if name not in self.viewer.layers:
            return
        layer = self.viewer.layers[name]
        _layers.show_page(self.viewer, layer, page)
        self.viewer.layers.selection.active = layer

    # -- retrain -------------------------------------------------------------------------
    def retrain(self):
        """Retrain the model folder in a worker; returns the worker, or None."""
        from napari.qt.threading import thread_worker

        if self.worker is not None or not self.bundle():
            return None
        self._stop.clear()
        worker = thread_worker(_retrain_job, ignore_errors=True)(self.bundle(), self._stop)
        worker.returned.connect(self._retrained)
        return self._start(
            worker,
            "Retraining with the new labels, then scoring the old and "
            "the new model on the same test list...",
        )

    def _retrained(self, result: active.Retrained) -> None:
        self.retrained = result
        if getattr(result.train_result, "bundle", None) is None:
            self.status.setText("Retraining stopped; the model is unchanged.")
            return
        self.result.setText(result.summary())
        self.status.setText(
            f"Model saved to {result.bundle}; the previous one is in "
            "previous/ (Predict's Restore previous switches back)."
        )
        _notify("info", result.summary())
        SESSION.set_bundle(result.bundle)

    def closeEvent(self, event):
        self._stop.set()
        super().closeEvent(event)
