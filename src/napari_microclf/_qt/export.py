"""A row to export a model folder: a format combo and an Export... button.

``ExportRow`` is placed into a widget that knows the model folder (the Predict widget calls
:meth:`ExportRow.set_model`). Export... asks where to write (a file, or a folder for a
SavedModel) with the default name next to the model folder; :meth:`ExportRow.export_to`
runs the export (``core.export.export_model``) in a napari ``thread_worker`` and says the
result, or the error, in napari's notifications.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QWidget

from ..core.export import FORMAT_HELP, FORMATS, default_out
from ._notify import notify as _notify

LABELS = {
    "bioimageio": "bioimage.io package",
    "savedmodel": "TensorFlow SavedModel",
    "onnx": "ONNX",
    "zip": "microclf zip",
}


class ExportRow(QWidget):
    """Format combo + Export... button for one model folder (see :meth:`set_model`)."""

    exported = Signal(object)  # the ExportResult
    failed = Signal(object)  # the exception

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model_folder: Path | None = None
        self.worker = None
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Export as"))
        self.format_combo = QComboBox()
        for i, fmt in enumerate(FORMATS):
            self.format_combo.addItem(LABELS[fmt], fmt)
            self.format_combo.setItemData(i, FORMAT_HELP[fmt], 3)  # Qt.ToolTipRole
        layout.addWidget(self.format_combo, 1)
        self.button = QPushButton("Export...")
        self.button.setToolTip("Export the model for use outside microclf (see docs/export.md)")
        self.button.clicked.connect(self.choose_and_export)
        layout.addWidget(self.button)
        self.set_model(None)

    def set_model(self, folder: str | Path | None) -> None:
        """The model folder (or zipped model) to export; None disables the row."""
        self.model_folder = Path(folder) if folder else None
        self.button.setEnabled(self.model_folder is not None and self.worker is None)

    @property
    def fmt(self) -> str:
        return self.format_combo.currentData()

    def set_format(self, fmt: str) -> None:
        self.format_combo.setCurrentIndex(FORMATS.index(fmt))

    def choose_and_export(self):
        """Ask where to write, then :meth:`export_to` it."""
        if self.model_folder is None:
            return None
        suggested = str(default_out(self.model_folder, self.fmt))
        if self.fmt == "savedmodel":
            parent = QFileDialog.getExistingDirectory(
                self, "Folder to write the SavedModel folder into", str(Path(suggested).parent)
            )
            path = str(Path(parent) / Path(suggested).name) if parent else ""
        else:
            path, _ = QFileDialog.getSaveFileName(self, f"Export as {LABELS[self.fmt]}", suggested)
        if not path:
            return None
        # the save dialog asked before replacing a file; a SavedModel folder of that name is
        # replaced only when it is one (the folder dialog asked nothing)
        target = Path(path)
        overwrite = (
            self.fmt != "savedmodel" or not target.exists() or (target / "saved_model.pb").is_file()
        )
        return self.export_to(path, overwrite=overwrite)

    def export_to(self, path: str | Path, overwrite: bool = False):
        """Export the model to ``path`` in the chosen format, in a worker; returns it.

        The file dialog has already asked before replacing a file (``overwrite``)."""
        from napari.qt.threading import thread_worker

        from ..core.errors import MicroclfError
        from ..core.export import export_model
        from ._worker import WorkerError

        if self.model_folder is None or self.worker is not None:
            return None
        folder, fmt = self.model_folder, self.fmt
        if fmt != "zip":
            from ._tf import ensure_tensorflow

            ensure_tensorflow()  # in the main thread, before the worker imports it

        def work():
            # superqt drops a worker's RuntimeError (the sign of a deleted worker) without
            # ``errored``: ours travel as MicroclfError, others as WorkerError (see _worker)
            try:
                return export_model(folder, fmt, path, overwrite=overwrite)
            except RuntimeError as exc:
                if isinstance(exc, MicroclfError):
                    raise MicroclfError(str(exc)) from exc
                raise WorkerError(f"{type(exc).__name__}: {exc}") from exc

        worker = self.worker = thread_worker(work, ignore_errors=True)()
        self.button.setEnabled(False)
        self.button.setText("Exporting...")

        def on_done(result):
            mb = result.size_bytes / 1e6
            check = (
                f"; checked: probabilities within {result.max_abs_diff:.1g} of the model's"
                if result.max_abs_diff is not None
                else ""
            )
            _notify(
                "info",
                f"Exported {folder.name} as {LABELS[fmt]} to {result.path} "
                f"({mb:.1f} MB, {result.seconds:.0f} s{check})",
            )
            self.exported.emit(result)

        def on_error(exc):
            _notify("error", f"Export failed: {exc}")
            self.failed.emit(exc)

        def on_finished():
            self.worker = None
            self.button.setText("Export...")
            self.set_model(self.model_folder)

        worker.returned.connect(on_done)
        worker.errored.connect(on_error)
        worker.finished.connect(on_finished)
        worker.start()
        return worker
