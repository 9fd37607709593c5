"""The Review widget: a model's confusion matrix whose cells open their images in napari.

A click on a cell (here, or in the Train widget's report) opens the test pages of that cell
as one stack layer ``Review <true> → <predicted>`` with, per page, the true class, the
predicted class and the confidence (a text Points layer whose features hold them, and the
image layer's metadata). The list steps through them; for each the user moves the file to
the right class, sends it to the dataset's ``.trash``, or keeps it (``core.review``: atomic
moves, the split follows). Annotate's counts follow through the session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core import review as rv
from ..core.errors import MicroclfError
from . import _layers
from ._notify import notify as _notify
from ._plots import ConfusionCanvas
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._worker import surfaced

ARROW = "\u2192"


@surfaced
def _stack_job(entries: list[dict]):
    """Worker: the display stack of the entries' pages (read in the background)."""
    yield len(entries)
    return rv.page_stack(entries)


class ReviewWidget(QWidget):
    """Model folder -> confusion matrix -> a cell's images -> move / trash / keep each."""

    def __init__(self, napari_viewer, bundle: str | Path | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.report: dict | None = None
        self.data_dir: Path | None = None
        self.entries: list[dict] = []  # the open cell's pages, with "status" once acted on
        self.cell: tuple[str, str] | None = None
        self.worker = None

        self.bundle_edit = QLineEdit(str(bundle or SESSION.last_bundle or ""))
        self.bundle_edit.setPlaceholderText("model folder (its report.json is reviewed)")
        self.bundle_edit.editingFinished.connect(lambda: self.load())
        connect_widget(SESSION.bundle_trained, self, "_follow_bundle")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.confusion = ConfusionCanvas("Confusion matrix: click a cell")
        self.confusion.cell_clicked.connect(self.open_cell)

        self.list = QListWidget()
        self.list.setToolTip("The cell's images, least confident first; selecting one shows it.")
        self.list.currentRowChanged.connect(self._show_row)
        self.move_class = QComboBox()
        self.move_class.setToolTip("The class the selected image really belongs to.")
        self.move_btn = QPushButton("Move to class")
        self.move_btn.setToolTip(
            "Move the file into that class folder of the dataset; it "
            "keeps its place in the split (a test image stays test)."
        )
        self.move_btn.clicked.connect(lambda: self.move_current())
        self.trash_btn = QPushButton("Send to trash")
        self.trash_btn.setToolTip(
            "Move the file into the dataset's .trash folder (nothing is "
            "deleted) and out of the split."
        )
        self.trash_btn.clicked.connect(lambda: self.trash_current())
        self.keep_btn = QPushButton("Keep")
        self.keep_btn.setToolTip("The label is right: leave the file and go to the next one.")
        self.keep_btn.clicked.connect(lambda: self.keep_current())
        act_row = QHBoxLayout()
        act_row.addWidget(self.move_btn)
        act_row.addWidget(self.move_class, 1)
        act2 = QHBoxLayout()
        act2.addWidget(self.trash_btn)
        act2.addWidget(self.keep_btn)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        intro = QLabel(
            "Review the test images behind each cell of the confusion matrix and fix wrong labels."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addWidget(QLabel("Model folder"))
        layout.addLayout(folder_row(self.bundle_edit, "Model folder", self))
        layout.addWidget(self.info)
        layout.addWidget(self.confusion)
        layout.addWidget(self.list, 1)
        layout.addLayout(act_row)
        layout.addLayout(act2)
        layout.addWidget(self.status)
        self.viewer.dims.events.current_step.connect(self._follow_slider)
        self._enable()
        if self.bundle_edit.text().strip():
            self.load(quiet=True)

    # -- the report --------------------------------------------------------------------
    def _follow_bundle(self, path: str) -> None:
        self.bundle_edit.setText(path)
        self.load(quiet=True)

    def load(
        self, report: dict | None = None, bundle: str | Path | None = None, quiet: bool = False
    ) -> bool:
        """Show a report: ``report`` itself, or the ``report.json`` of the model folder."""
        from ..core.bundle import read_meta

        if bundle is not None:
            self.bundle_edit.setText(str(bundle))
        folder = self.bundle_edit.text().strip()
        try:
            if report is None:
                report = rv.load_report(Path(folder).expanduser())
            meta = {}
            if folder and Path(folder).expanduser().is_dir():
                try:
                    meta = read_meta(Path(folder).expanduser())
                except MicroclfError:
                    meta = {}
        except MicroclfError as exc:
            if not quiet:
                _notify("error", f"Review: {exc}")
            self.info.setText(str(exc))
            return False
        self.report = report
        data = report.get("data") or meta.get("data_dir")
        self.data_dir = Path(data) if data else None
        names = report.get("class_names") or []
        self.confusion.plot(report["confusion_matrix"], names)
        self.move_class.clear()
        self.move_class.addItems(names)
        acc = report.get("accuracy")
        self.info.setText(
            (
                f"{report.get('title') or 'Test report'}: accuracy {acc:.1%} on {report['n']} "
                "images."
                if acc is not None
                else "No test images in this report."
            )
            + (f" Dataset: {self.data_dir}" if self.data_dir else "")
        )
        return True

    # -- a cell ------------------------------------------------------------------------
    def layer_name(self, true: str, predicted: str) -> str:
        return f"Review {true} {ARROW} {predicted}"

    def open_cell(self, true: str, predicted: str):
        """Open the cell's pages as one stack layer (read in a worker); returns the worker,
        or None when there is nothing to open."""
        from napari.qt.threading import thread_worker

        if self.report is None:
            _notify("warning", "Review: choose a model folder with a test report first.")
            return None
        try:
            entries = rv.cell_pages(self.report, true, predicted)
        except MicroclfError as exc:
            _notify("error", f"Review: {exc}")
            return None
        found = []
        for e in entries:
            path = rv.locate(e, self.data_dir)
            if path is not None:
                found.append({**e, "file": str(path)})
        gone = len(entries) - len(found)
        if not found:
            self.status.setText(
                f"No images in {true} {ARROW} {predicted}"
                + (f" ({gone} moved away or deleted since)." if gone else ".")
            )
            return None
        if self.worker is not None:
            _notify("warning", "Review: the last cell is still opening.")
            return None
        self.status.setText(f"Opening {len(found)} image(s) of {true} {ARROW} {predicted}...")

        def done(stack):
            self.cell = (true, predicted)
            self.entries = found
            self._show_stack(stack)
            self._fill_list()
            self.status.setText(
                f"{len(found)} image(s): true {true}, predicted {predicted}"
                + (f"; {gone} moved away or deleted since the report" if gone else "")
                + ". Move, trash or keep each."
            )

        worker = thread_worker(_stack_job, ignore_errors=True)(found)
        worker.returned.connect(done)
        worker.errored.connect(lambda exc: _notify("error", f"Review: {exc}"))
        worker.finished.connect(self._worker_done)
        self.worker = worker
        worker.start()
        return worker

    def _worker_done(self) -> None:
        self.worker = None

    def _show_stack(self, stack: rv.PageStack) -> None:
        true, predicted = self.cell
        name = self.layer_name(true, predicted)
        meta = {
            "origins": stack.origins,
            "review": {
                "true": true,
                "predicted": predicted,
                "data": str(self.data_dir),
                "pages": self.entries,
            },
        }
        rgb = stack.data.ndim == 4
        for old in (self.points_name(name), name):  # a cell opened again: its fresh pages
            if old in self.viewer.layers:
                self.viewer.layers.remove(old)
        layer = self.viewer.add_image(stack.data, name=name, rgb=rgb, contrast_limits=(0, 1))
        layer.metadata["microclf"] = meta
        # above the image's top edge (Label next writes under its bottom edge, Predict
        # inside from the top: the texts of the widgets never overlap)
        coords = np.array([[i, -0.5, -0.5] for i in range(len(self.entries))], float)
        pts = self.viewer.add_points(
            coords,
            features=self._features(),
            name=self.points_name(name),
            size=1,
            face_color="transparent",
            border_width=0,
            blending="translucent_no_depth",
            text={
                "string": "{status}true {true} " + ARROW + " predicted {predicted} "
                "({confidence:.2f})",
                "anchor": "upper_left",
                "size": 11,
                "color": "yellow",
            },
        )
        pts.metadata["microclf"] = {"image_layer": name}
        _layers.follow_visibility(self.viewer, layer, pts)
        self.viewer.layers.selection.active = layer
        self._go_to(0)

    def points_name(self, name: str) -> str:
        return f"{name} labels"

    def _features(self) -> dict:
        return {
            "file": [Path(e["file"]).name for e in self.entries],
            "page": [int(e.get("page", 0)) for e in self.entries],
            "true": [e["true"] for e in self.entries],
            "predicted": [e["predicted"] for e in self.entries],
            "confidence": [float(e["confidence"]) for e in self.entries],
            "status": [f"[{e['status']}] " if e.get("status") else "" for e in self.entries],
        }

    def _row_text(self, i: int) -> str:
        e = self.entries[i]
        page = f" p{e['page']}" if e.get("page") else ""
        state = f"  [{e['status']}]" if e.get("status") else ""
        return f"{i + 1}. {Path(e['file']).name}{page}: {e['confidence']:.2f}{state}"

    def _fill_list(self) -> None:
        self.list.blockSignals(True)
        self.list.clear()
        self.list.addItems([self._row_text(i) for i in range(len(self.entries))])
        self.list.blockSignals(False)
        if self.entries:
            self.list.setCurrentRow(0)
        self._enable()

    def _enable(self) -> None:
        row = self.list.currentRow()
        ok = 0 <= row < len(self.entries) and self.entries[row].get("status") not in ("trashed",)
        for b in (self.move_btn, self.trash_btn, self.keep_btn):
            b.setEnabled(ok)

    def layer(self):
        if self.cell is None:
            return None
        name = self.layer_name(*self.cell)
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def _go_to(self, row: int) -> None:
        layer = self.layer()
        if layer is None or not 0 <= row < len(self.entries):
            return
        _layers.show_page(self.viewer, layer, row)

    def _show_row(self, row: int) -> None:
        self._go_to(row)
        self._enable()
        if 0 <= row < len(self.entries):
            self.move_class.setCurrentText(self.entries[row]["predicted"])

    def _follow_slider(self, *_) -> None:
        layer = self.layer()
        if layer is None or not self.entries:
            return
        page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer))
        if page is not None and page != self.list.currentRow():
            self.list.setCurrentRow(page)

    # -- acting on the current image ---------------------------------------------------
    def current(self) -> int:
        return self.list.currentRow()

    def _act(self, status: str, new_file: Path | None) -> None:
        row = self.current()
        e = self.entries[row]
        e["status"] = status
        if new_file is not None:
            e["file"] = str(new_file)
        layer = self.layer()
        if layer is not None:
            layer.metadata["microclf"]["origins"][row]["file"] = e["file"]
            pname = self.points_name(layer.name)
            if pname in self.viewer.layers:
                pts = self.viewer.layers[pname]
                pts.features = self._features()
                pts.refresh_text()
        self.list.item(row).setText(self._row_text(row))
        if row + 1 < len(self.entries):
            self.list.setCurrentRow(row + 1)
        else:
            self._enable()

    def _root(self) -> Path | None:
        if self.data_dir is None:
            _notify(
                "error",
                "Review: the report names no dataset folder; relabel the file "
                "in its class folder yourself.",
            )
        return self.data_dir

    def move_current(self, class_name: str | None = None) -> Path | None:
        """Move the selected image's file into ``class_name`` (default: the chooser's)."""
        row, root = self.current(), self._root()
        if root is None or not 0 <= row < len(self.entries):
            return None
        new = class_name or self.move_class.currentText()
        e = self.entries[row]
        try:
            dst = rv.relabel_example(root, e["file"], new)
        except (MicroclfError, OSError) as exc:
            _notify("error", f"Cannot move {Path(e['file']).name}: {exc}")
            return None
        self.status.setText(f"Moved {dst.name} to '{new}' (it keeps its place in the split).")
        self._act(f"moved to {new}" if Path(e["file"]) != dst else "kept", dst)
        SESSION.edited(root)
        return dst

    def trash_current(self) -> Path | None:
        row, root = self.current(), self._root()
        if root is None or not 0 <= row < len(self.entries):
            return None
        e = self.entries[row]
        try:
            dst = rv.trash_example(root, e["file"])
        except (MicroclfError, OSError) as exc:
            _notify("error", f"Cannot move {Path(e['file']).name} to the trash: {exc}")
            return None
        self.status.setText(f"Moved {Path(e['file']).name} to {dst.parent}.")
        self._act("trashed", dst)
        SESSION.edited(root)
        return dst

    def keep_current(self) -> None:
        if 0 <= self.current() < len(self.entries):
            self._act("kept", None)


def review_dock(viewer) -> ReviewWidget | None:
    """The viewer's Review widget, docked on first use (None without a napari window)."""
    window = getattr(viewer, "window", None)
    if window is None:
        return None
    for docked in dict(getattr(window, "dock_widgets", {}) or {}).values():
        inner = _layers.unwrapped(docked)  # Qt takes the widget, not napari's proxy of it
        if isinstance(inner, ReviewWidget):
            inner.parent().show()  # the dock around it, if the user closed it
            return inner
        review = _layers.unwrapped(getattr(inner, "review", None))  # the tabbed dock
        if isinstance(review, ReviewWidget):
            inner.parent().show()
            inner.setCurrentWidget(review)
            return review
    review = ReviewWidget(viewer)
    window.add_dock_widget(review, name="Review errors", area="right")
    return review
