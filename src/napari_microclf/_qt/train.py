"""Train: the training guide's settings, one Start/Stop button, live log, curves and report.

Training runs :func:`core.train.train` in a napari ``thread_worker``; the worker gets a
frozen :class:`TrainConfig` and a stop event, never this widget. Updates come back through
``yielded`` and are drawn here, in the main thread.
"""

from __future__ import annotations

import enum
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QFormLayout,
        QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.dataset import DatasetError, check_dataset
from ..core.images import ImageReadError
from ..core.model import (
    IMAGENET_FILE,
    META_FILE,
    BundleError,
    WeightsError,
    imagenet_cached,
    keras_home,
)
from ..core.train import (
    FROM_SCRATCH,
    BatchEnd,
    EpochEnd,
    EpochStart,
    Message,
    Progress,
    TrainConfig,
    TrainResult,
    train,
)
from ._plots import ConfusionCanvas, CurvesCanvas
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._tf import ensure_tensorflow
from ._worker import updates

DEFAULT_MODEL = "microclf-model"
SETUP_ERRORS = (DatasetError, WeightsError, BundleError, ImageReadError, ValueError, OSError)

# One-line tooltips, in the training guide's words.
TIPS = {
    "epochs": "An epoch is one complete pass through the entire training dataset. Start with "
              "15 (10-20 for small datasets, < 500 images).",
    "batch_size": "A batch is a group of training examples processed together before "
                  "updating model weights. 16-32 for most datasets; 8-16 if you have <100 "
                  "images per class.",
    "learning_rate": "Controls how much the model weights are adjusted during training; a "
                     "conservative 0.0001 by default, reduced when performance plateaus.",
    "image_size": "Side in pixels each image is resized to (padded, never cropped). "
                  "EfficientNet B0 with ImageNet weights expects 224.",
    "val_split": "Fraction of the images in the validation set, used to measure performance "
                 "after each epoch (val_loss, val_accuracy).",
    "test_split": "Fraction kept apart until the end: use the test accuracy as the true "
                  "performance metric.",
    "augment": "Small random transformations (flips, rotations, zoom, contrast) applied to "
               "increase dataset diversity.",
    "augment_strength": "Range of rotation, zoom and contrast: 0.05 is ±5% (gentle); for "
                        "larger datasets you might want 10-20%.",
    "dropout": "More dropout (0.3-0.4) for very small datasets, less (0.1-0.2) for large "
               "ones; a remedy for overfitting.",
    "class_weights": "Gives more importance to underrepresented classes, for imbalanced "
                     "datasets.",
    "early_stopping": "Stops when the validation loss stops improving and keeps the best "
                      "epoch, for when validation accuracy peaks early then declines.",
    "fine_tune": "0 uses the pre-trained base as a frozen feature extractor and trains only "
                 "the head; for larger datasets, unfreeze top layers of the base model.",
    "weights": "ImageNet: the base model was trained on millions of images (transfer "
               "learning). None: start from random weights (then train all layers).",
    "weights_file": "An EfficientNetB0 (no top) .h5 weights file.",
    "seed": "Random seed: the same seed gives the same split and the same training.",
    "cache": "With a frozen base, compute each image's features once (kept in the dataset's "
             ".microclf-cache) and train only the head each epoch; off: the full pipeline.",
    "views": "Augmented views per training image whose features are computed once; each "
             "epoch uses one of them (4: chosen by measurement, see docs/performance.md).",
}


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Failed:
    """A set-up problem the core explained (no dataset, one class, unwritable folder...)."""

    message: str


# The settings that train without ImageNet weights in minutes (as ``microclf demo`` does).
FROM_SCRATCH_NOTE = (
    "No ImageNet weights in the Keras cache ({path}), so the settings train the whole network "
    "from scratch on 48 px images (weights none, fine-tuning all, learning rate 0.001, no "
    "augmentation, 20 epochs). With the weights in place, the guide's defaults (ImageNet, "
    "frozen base, 224 px) apply."
)


def _train_job(config: TrainConfig, stop: threading.Event):
    """The worker: relays core.train's updates; a set-up problem becomes a Failed result."""
    try:
        return (yield from updates(train, config, stop=stop))
    except SETUP_ERRORS as exc:
        return Failed(str(exc))


def check_out_dir(out: str | Path) -> None:
    """Refuse before training an output folder that cannot be written or is not a model."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is a file; choose a folder for the model")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).exists():
        raise BundleError(f"{out} exists and is not a microclf model folder; choose another "
                          "output folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise BundleError(f"cannot write the model next to {out} ({exc.strerror or exc}); "
                          "choose a folder you can write to") from exc




class TrainWidget(QWidget):
    """Settings, Start/Stop, progress, and a live panel: log, curves, test report."""

    def __init__(self, napari_viewer=None, dataset: str | Path | None = None,
                 out_dir: str | Path | None = None):
        super().__init__()
        ensure_tensorflow()
        self.viewer = napari_viewer
        self.state = State.IDLE
        self.worker = None
        self.result: TrainResult | None = None
        self.history: dict = {}
        self._stop = threading.Event()
        self._pbars: dict = {}
        self._overrides: dict = {}  # from-scratch settings that have no field in the form
        self._dataset_set_by_user = dataset is not None

        # -- folders
        self.data_edit = QLineEdit(str(dataset or SESSION.dataset or "microclf-dataset"))
        self.data_edit.setToolTip("The dataset: one sub-folder of images per class.")
        self.data_edit.textEdited.connect(self._user_set_dataset)
        self.out_edit = QLineEdit(str(out_dir or DEFAULT_MODEL))
        self.out_edit.setToolTip("The model folder to write; an earlier model there is "
                                 "replaced only when training succeeds.")
        folders = QFormLayout()
        folders.addRow("Dataset", folder_row(self.data_edit, "Dataset folder", self))
        folders.addRow("Model folder", folder_row(self.out_edit, "Model folder", self))
        connect_widget(SESSION.dataset_changed, self, "_follow_dataset")

        # -- settings (magicgui widgets, the guide's defaults)
        d = TrainConfig("")
        self.form = Container(widgets=[
            SpinBox(name="epochs", value=d.epochs, min=1, max=1000),
            SpinBox(name="batch_size", value=d.batch_size, min=1, max=1024),
            FloatSpinBox(name="learning_rate", value=d.learning_rate, min=1e-6, max=0.1,
                         step=1e-5),
            SpinBox(name="image_size", value=d.image_size, min=32, max=1024, step=16),
            FloatSpinBox(name="val_split", label="validation split", value=d.val_split, min=0,
                         max=0.5, step=0.05),
            FloatSpinBox(name="test_split", value=d.test_split, min=0, max=0.5, step=0.05),
            CheckBox(name="augment", text="augmentation", value=d.augment),
            FloatSpinBox(name="augment_strength", label="augmentation strength",
                         value=d.augment_strength, min=0, max=0.5, step=0.01),
            FloatSpinBox(name="dropout", value=d.dropout, min=0, max=0.9, step=0.05),
            CheckBox(name="class_weights", text="class weights", value=d.class_weights),
            CheckBox(name="early_stopping", text="early stopping", value=d.early_stopping),
            ComboBox(name="fine_tune", label="fine-tuning", value=0, choices=[
                ("frozen base (train the head)", 0),
                *[(f"top {n} of 7 stages", n) for n in range(1, 8)],
                ("all layers", "all")]),
            ComboBox(name="weights", value="imagenet", choices=[
                ("ImageNet (pretrained)", "imagenet"), ("from a file", "file"),
                ("none (random start)", "none")]),
            FileEdit(name="weights_file", label="weights file", mode="r",
                     filter="*.h5", visible=False),
            SpinBox(name="seed", value=d.seed, min=0, max=2**31 - 1),
            CheckBox(name="cache", text="cache backbone features (fast, frozen base)",
                     value=d.cache),
            SpinBox(name="views", label="augmented views", value=d.views, min=0, max=32),
        ], labels=True)
        for w in self.form:
            w.tooltip = TIPS[w.name]
        self.form.weights.changed.connect(
            lambda v: setattr(self.form.weights_file, "visible", v == "file"))
        self.form.augment.changed.connect(
            lambda v: setattr(self.form.augment_strength, "enabled", v))

        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #ffbf5f;")
        self.scratch_btn = QPushButton("Use settings that work without ImageNet weights")
        self.scratch_btn.clicked.connect(lambda: self.use_from_scratch())
        if imagenet_cached():
            self.note.hide()
            self.scratch_btn.hide()
        else:
            cached = keras_home() / "models" / IMAGENET_FILE
            self.note.setText(
                f"No ImageNet weights in the Keras cache ({cached}). They are downloaded on "
                "the first training if this computer is online; offline, train from scratch "
                "instead:")

        # -- start / stop and progress
        self.start_btn = QPushButton("Start training")
        self.start_btn.clicked.connect(self.toggle)
        self.epoch_bar = QProgressBar()
        self.epoch_bar.setFormat("Epoch %v/%m")
        self.batch_bar = QProgressBar()
        self.batch_bar.setFormat("Batch %v/%m")
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        # -- live panel
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setLineWrapMode(QPlainTextEdit.NoWrap)
        mono = QFont("Monospace")
        mono.setStyleHint(QFont.TypeWriter)
        mono.setPointSize(8)
        self.log.setFont(mono)
        self.log.setMinimumHeight(160)
        self.curves = CurvesCanvas()
        self.report_label = QLabel("The test report appears when training ends.")
        self.report_label.setWordWrap(True)
        self.report_label.setTextFormat(Qt.RichText)
        self.class_table = QTableWidget(0, 5)
        self.class_table.setHorizontalHeaderLabels(["class", "precision", "recall", "F1",
                                                    "support"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.class_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.class_table.setMinimumHeight(110)
        self.confusion = ConfusionCanvas()
        self.diagnosis = QLabel("")
        self.diagnosis.setWordWrap(True)
        self.diagnosis.setTextFormat(Qt.RichText)
        report = QWidget()
        rl = QVBoxLayout(report)
        for w in (self.report_label, self.class_table, self.confusion, self.diagnosis):
            rl.addWidget(w)
        settings = QScrollArea()
        settings.setWidgetResizable(True)
        settings.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        settings.setWidget(self.form.native)
        settings.setToolTip("Defaults from the training guide; hover a setting for help.")
        self.tabs = QTabWidget()
        self.tabs.addTab(settings, "Settings")
        self.tabs.addTab(self.log, "Log")
        self.tabs.addTab(self.curves, "Curves")
        self.tabs.addTab(report, "Test report")
        self.tabs.setMinimumHeight(420)

        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.addLayout(folders)
        layout.addWidget(self.note)
        layout.addWidget(self.scratch_btn)
        layout.addWidget(self.start_btn)
        layout.addWidget(self.epoch_bar)
        layout.addWidget(self.batch_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.tabs, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(380)

    # -- settings ------------------------------------------------------------------------
    def _user_set_dataset(self, *_):
        self._dataset_set_by_user = True

    def _follow_dataset(self, path: str) -> None:
        if not self._dataset_set_by_user:
            self.data_edit.setText(path)

    def set_folders(self, dataset=None, out_dir=None) -> None:
        if dataset is not None:
            self.data_edit.setText(str(dataset))
            self._dataset_set_by_user = True
        if out_dir is not None:
            self.out_edit.setText(str(out_dir))

    def use_from_scratch(self, note: bool = True) -> None:
        """Settings that train in minutes without ImageNet weights, and say why."""
        for name, value in FROM_SCRATCH.items():
            if hasattr(self.form, name):
                getattr(self.form, name).value = value
            else:  # settings without a field in the form travel with the config
                self._overrides[name] = value
        if note:
            self.note.setText(FROM_SCRATCH_NOTE.format(
                path=keras_home() / "models" / IMAGENET_FILE))
            self.note.show()
        self.scratch_btn.hide()

    def config(self) -> TrainConfig:
        f = self.form
        weights = f.weights.value
        if weights == "file":
            weights = str(f.weights_file.value)
        return TrainConfig(
            data_dir=str(Path(self.data_edit.text().strip()).expanduser()),
            out_dir=str(Path(self.out_edit.text().strip() or DEFAULT_MODEL).expanduser()),
            epochs=f.epochs.value, batch_size=f.batch_size.value,
            learning_rate=f.learning_rate.value, image_size=f.image_size.value,
            val_split=f.val_split.value, test_split=f.test_split.value,
            augment=f.augment.value, augment_strength=f.augment_strength.value,
            dropout=f.dropout.value, class_weights=f.class_weights.value,
            early_stopping=f.early_stopping.value, weights=weights,
            fine_tune=f.fine_tune.value, seed=f.seed.value, cache=f.cache.value,
            views=f.views.value, **self._overrides)

    # -- start / stop --------------------------------------------------------------------
    def toggle(self) -> None:
        if self.state is State.IDLE:
            self.start()
        elif self.state is State.RUNNING:
            self.stop()

    def _set_state(self, state: State) -> None:
        self.state = state
        self.start_btn.setText({State.IDLE: "Start training", State.RUNNING: "Stop",
                                State.STOPPING: "Stopping..."}[state])
        self.start_btn.setEnabled(state is not State.STOPPING)
        self.form.enabled = state is State.IDLE
        self.data_edit.setEnabled(state is State.IDLE)
        self.out_edit.setEnabled(state is State.IDLE)

    def start(self):
        """Check the set-up, then train in a worker; returns the worker (None if refused)."""
        from napari.qt.threading import thread_worker

        from ..core.model import normalize_weights

        if self.state is not State.IDLE:
            return None
        try:
            config = self.config()
            check_dataset(config.data_dir)
            normalize_weights(config.weights)
            check_out_dir(config.out_dir)
        except SETUP_ERRORS as exc:
            self._fail(str(exc))
            return None
        self._reset_panel(config)
        self._stop = threading.Event()
        worker = thread_worker(_train_job, ignore_errors=True)(config, self._stop)
        worker.yielded.connect(self._on_update)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        worker.errored.connect(lambda exc: self._say(f"Training failed: {exc}"))
        self.worker = worker
        self._set_state(State.RUNNING)
        self._say(f"Training on {config.data_dir}...")
        worker.start()
        return worker

    def stop(self) -> None:
        """Ask the training to stop after the current batch; nothing is written."""
        if self.state is State.RUNNING:
            self._stop.set()
            self._set_state(State.STOPPING)
            self._say("Stopping after the current batch...")

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._say(f"Cannot train: {message}")
        show_error(f"Cannot train: {message}")

    # -- the live panel ------------------------------------------------------------------
    def _reset_panel(self, config: TrainConfig) -> None:
        from napari.utils import progress

        self.result = None
        self.history = {}
        self.log.clear()
        self.curves.plot({})
        self.tabs.setCurrentWidget(self.log)
        self.epoch_bar.setRange(0, config.epochs)
        self.epoch_bar.setValue(0)
        self.batch_bar.setRange(0, 1)
        self.batch_bar.setValue(0)
        self._close_pbars()
        self._pbars["epochs"] = progress(total=config.epochs, desc="Training epochs")

    def _close_pbars(self, *names) -> None:
        for name in names or list(self._pbars):
            pbar = self._pbars.pop(name, None)
            if pbar is not None:
                pbar.close()

    def _append(self, text: str, warning: bool = False) -> None:
        self.log.appendPlainText(("Warning: " if warning else "") + text)

    def _on_update(self, u) -> None:
        from napari.utils import progress

        if u is None:
            return
        if isinstance(u, Message):
            self._append(u.text, u.level == "warning")
        elif isinstance(u, Progress):
            self._say(u.text)
            self.batch_bar.setFormat(f"{u.phase} %v/%m")
            self.batch_bar.setRange(0, max(u.total, 1))
            self.batch_bar.setValue(u.done)
        elif isinstance(u, EpochStart):
            self._append(u.text)
            self._say(f"{u.text}...")
            self._close_pbars("batches")
            self._pbars["batches"] = progress(total=1, desc=u.text)
            self.batch_bar.setFormat("Batch %v/%m")
            self.batch_bar.setValue(0)
        elif isinstance(u, BatchEnd):
            self.batch_bar.setRange(0, u.steps)
            self.batch_bar.setValue(u.batch)
            pbar = self._pbars.get("batches")
            if pbar is not None:
                if pbar.total != u.steps:
                    pbar.total = u.steps
                pbar.update(u.batch - pbar.n)
            logs = " - ".join(f"{k}: {v:.4f}" for k, v in u.logs.items()
                              if k in ("loss", "accuracy"))
            self._say(f"Epoch {u.epoch}/{u.epochs} - batch {u.batch}/{u.steps} - {logs}")
        elif isinstance(u, EpochEnd):
            self._append(u.text)
            self.history = u.history
            self.epoch_bar.setValue(u.epoch)
            pbar = self._pbars.get("epochs")
            if pbar is not None:
                pbar.update(u.epoch - pbar.n)
            self.curves.plot(u.history)
            if u.epoch == 1:
                self.tabs.setCurrentWidget(self.curves)

    def _on_returned(self, result) -> None:
        from napari.utils.notifications import show_info

        if isinstance(result, Failed):
            self._fail(result.message)
            return
        self.result = result
        if result.stopped:
            self._say(f"Stopped after {result.epochs_run} epoch(s); no model was written.")
            return
        self.show_report(result.report or {}, result.bundle)
        SESSION.set_bundle(result.bundle)
        acc = (result.report or {}).get("accuracy")
        self._say(f"Done in {result.seconds:.0f}s: model saved to {result.bundle}"
                  + (f"; test accuracy {acc:.1%}." if acc is not None else "."))
        show_info(f"Model saved to {result.bundle}; the Predict widget will use it.")

    def _on_finished(self) -> None:
        self._close_pbars()
        self._set_state(State.IDLE)
        self.worker = None

    def show_report(self, report: dict, bundle=None) -> None:
        """Test accuracy, per-class table, confusion matrix and the diagnosis."""
        from html import escape

        names = report.get("class_names", [])
        if report.get("n"):
            head = (f"<b style='font-size:14pt'>Test accuracy: {report['accuracy']:.1%}</b> "
                    f"on {report['n']} test images never seen in training.")
        else:
            head = "<b>No test images</b>: raise the test split or add images."
        if bundle is not None:
            head += f"<br>Model: {escape(str(bundle))} (report.md inside)"
        self.report_label.setText(head)
        rows = report.get("per_class", [])
        self.class_table.setRowCount(len(rows))
        for r, c in enumerate(rows):
            for col, text in enumerate((c["class"], f"{c['precision']:.2f}",
                                        f"{c['recall']:.2f}", f"{c['f1']:.2f}",
                                        str(c["support"]))):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignCenter)
                self.class_table.setItem(r, col, item)
        if names and report.get("confusion_matrix") is not None:
            self.confusion.plot(report["confusion_matrix"], names)
        items = "".join(f"<li><b>{escape(f['finding'])}</b>: {escape(f['evidence'])}.<br>"
                        f"<i>What to do:</i> {escape(f['remedy'])}</li>"
                        for f in report.get("diagnosis", []))
        self.diagnosis.setText(f"<b>Diagnosis</b><ul>{items}</ul>" if items else "")
        self.tabs.setCurrentIndex(3)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def closeEvent(self, event):  # noqa: N802 - Qt's name
        self._stop.set()
        super().closeEvent(event)

