"""Train: the training guide's settings, one Start/Stop button, live log, curves and report.

The Settings tab is made from :class:`TrainConfig`'s fields (``train_form``). Training runs
:func:`core.train.train` in a napari ``thread_worker``; the worker gets a frozen
:class:`TrainConfig` and a stop event, never this widget. Updates come back through
``yielded`` and are drawn here, in the main thread.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from magicgui.widgets import FileEdit
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.dataset import check_dataset
from ..core.errors import MicroclfError
from ..core.model import IMAGENET_FILE
from ..core.preflight import check_folders, user_message
from ..core.settings import keras_home
from ..core.train import (
    BatchEnd,
    EpochEnd,
    EpochStart,
    Message,
    PhaseStart,
    Preset,
    Progress,
    TrainConfig,
    TrainResult,
    count_images,
    most_epochs,
    suggest_settings,
    train,
)
from . import _settings
from ._plots import ConfusionCanvas, CurvesCanvas
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._tf import ensure_tensorflow
from ._worker import WorkerError, stoppable_progress, surfaced, updates
from .train_form import (
    backbone_choices,
    form_settings,
    preset_text,
    settings_form,
    weights_note,
)

DEFAULT_MODEL = "microclf-model"

# napari's progress bar of each preparation step of core.train (``Progress.phase``)
PHASES = {
    "loading": "Loading images",
    "features": "Computing backbone features",
    "evaluating": "Testing the model",
}


# How often the live panel follows the training: the status, the bars and the log at most
# every UPDATE_MS, the curves (a redraw of ~0.1-0.3 s) at most every CURVES_S; updates that
# come in between are coalesced, so that the event loop never waits long for the panel.
UPDATE_MS = 150
CURVES_S = 2.0


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Failed:
    """A problem the user can fix, as the core said it (a MicroclfError: no dataset, one
    class, bad images, an unwritable folder...; or the disk is full): one line to show."""

    message: str


@surfaced
def _train_job(config: TrainConfig, stop: threading.Event):
    """The worker: relays core.train's updates. Our errors (and the environment's, such as a
    full disk) become a Failed result; anything else is raised: a bug, shown with its
    traceback (:meth:`TrainWidget._on_error`)."""
    try:
        return (yield from updates(train, config, stop=stop))
    except Exception as exc:
        text = user_message(exc)
        if text is None:
            raise
        return Failed(text)


def _count_job(data_dir: str):
    """The Suggest-settings worker: the dataset's image count (a Failed if it cannot)."""
    try:
        check_dataset(data_dir)
        return count_images(data_dir)
    except Exception as exc:
        text = user_message(exc)
        if text is None:
            raise
        return Failed(text)


def model_start(meta: dict) -> str:
    """The model in the words of report.md and ``microclf predict`` (``describe_model``),
    plus the epoch where fine-tuning's phase 2 began; '' for a bundle without a backbone."""
    from ..core.report import describe_model

    if not meta.get("backbone"):
        return ""
    phases = meta.get("phases") or []
    return describe_model(meta) + (
        f", from epoch {phases[1]['epochs'][0]} after {phases[0]['epochs'][1]} head-only epoch(s)"
        if len(phases) > 1
        else ""
    )


NA = "n/a"
FEW_TEST_IMAGES = 30  # under this many test images a report says the numbers are rough


def class_row(c: dict, predicted: int | None = None) -> tuple[str, ...]:
    """A row of the per-class table: class, precision, recall, F1, support. A class without
    test images has no recall nor F1 (n/a, not 0.00), and no precision when no test image
    was predicted as it either (``predicted``: how many were; None when unknown)."""
    none = not c["support"]
    no_precision = none and not predicted
    return (
        c["class"],
        NA if no_precision else f"{c['precision']:.2f}",
        NA if none else f"{c['recall']:.2f}",
        NA if none else f"{c['f1']:.2f}",
        str(c["support"]),
    )


def few_test_images(n: int) -> str:
    """A warning for a report on a handful of test images ('' from FEW_TEST_IMAGES up)."""
    if not n or n >= FEW_TEST_IMAGES:
        return ""
    return (
        f"Only {n} test image{'' if n == 1 else 's'}: each is {1 / n:.0%} of the accuracy, "
        "so these numbers are rough; more images (or a larger test split) make them firm."
    )


class TrainWidget(QWidget):
    """Settings, Start/Stop, progress, and a live panel: log, curves, test report."""

    def __init__(
        self,
        napari_viewer=None,
        dataset: str | Path | None = None,
        out_dir: str | Path | None = None,
    ):
        super().__init__()
        ensure_tensorflow()
        self.viewer = napari_viewer
        self.report: dict | None = None  # the report shown (its cells open in Review)
        self.report_bundle = None
        self.state = State.IDLE
        self.worker = None
        self.result: TrainResult | None = None
        self.history: dict = {}
        self._stop = threading.Event()
        self._pbars: dict = {}  # napari's progress bars while training runs
        # the last run's bars (closed when it ended; what they reached stays readable)
        self.epochs_pbar = self.batches_pbar = None
        self._dataset_set_by_user = dataset is not None
        # the run's updates not shown yet (see _on_update and _flush)
        self._ended = True  # the run's final state is shown: later updates are stale
        self._log_lines: list[str] = []
        self._status: str | None = None
        self._bars: dict = {}  # bar name -> (description or None, n, total)
        self._curves_due = False  # self.history is newer than the curves
        self._curves_at = 0.0  # when the curves were drawn last
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.timeout.connect(self._flush)
        self._flushing = self._flush_again = False  # see _flush

        # -- folders
        self.data_edit = QLineEdit(str(dataset or SESSION.dataset or "microclf-dataset"))
        self.data_edit.setToolTip("The dataset: one sub-folder of images per class.")
        self.data_edit.textEdited.connect(self._user_set_dataset)
        self.out_edit = QLineEdit(str(out_dir or DEFAULT_MODEL))
        self.out_edit.setToolTip(
            "The model folder to write; an earlier model there is "
            "replaced only when training succeeds."
        )
        folders = QFormLayout()
        folders.addRow("Dataset", folder_row(self.data_edit, "Dataset folder", self))
        folders.addRow("Model folder", folder_row(self.out_edit, "Model folder", self))
        connect_widget(SESSION.dataset_changed, self, "_follow_dataset")

        # -- settings (made from TrainConfig's fields, the guide's defaults)
        self.form = settings_form()
        for name in ("backbone", "weights", "fine_tune"):
            getattr(self.form, name).changed.connect(self._update_note)

        # what "auto" (or the chosen weights) starts from on this computer
        self.note = QLabel()
        self.note.setWordWrap(True)
        from ..core.device import describe_device

        self.device = QLabel(f"Runs on: {describe_device()}")
        self.device.setToolTip(
            "The device TensorFlow trains on. With a GPU, TensorFlow "
            "takes the memory it needs as it goes (memory growth), not "
            "the whole card."
        )
        self.suggest_btn = QPushButton("Suggest settings")
        self.suggest_btn.setToolTip(
            "Count the dataset's images and fill in the training guide's settings for its "
            "size: very small (< 100 images), medium (100-1000) or large (> 1000). Every "
            "value stays editable."
        )
        self.suggest_btn.clicked.connect(lambda: self.suggest())
        self._counting = None  # the Suggest-settings worker while it counts
        self._update_note()

        # -- start / stop and progress
        self.start_btn = QPushButton("Start training")
        self.start_btn.clicked.connect(self.toggle)
        self.start_btn.setToolTip(
            "Start training; while it runs, stop it after the current "
            "batch (Cancel in napari's activity dock, bottom right, "
            "does the same). A stopped training writes no model."
        )
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        # -- live panel
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setLineWrapMode(QPlainTextEdit.WidgetWidth)  # long lines wrap, no scrolling
        mono = QFont("Monospace")
        mono.setStyleHint(QFont.TypeWriter)
        mono.setPointSize(8)
        self.log.setFont(mono)
        self.log.setMinimumHeight(160)
        self.curves = CurvesCanvas()
        self.curves.follow(napari_viewer)
        self.report_label = QLabel("The test report appears when training ends.")
        self.report_label.setWordWrap(True)
        self.report_label.setTextFormat(Qt.RichText)
        self.class_table = QTableWidget(0, 5)
        self.class_table.setHorizontalHeaderLabels(
            ["class", "precision", "recall", "F1", "support"]
        )
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.class_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.class_table.setMinimumHeight(110)
        self.confusion = ConfusionCanvas()
        self.confusion.follow(napari_viewer)
        self.confusion.cell_clicked.connect(self.review_cell)
        self.diagnosis = QLabel("")
        self.diagnosis.setWordWrap(True)
        self.diagnosis.setTextFormat(Qt.RichText)
        self.html_btn = QPushButton("Open HTML report")
        self.html_btn.setToolTip(
            "The model's whole report (set-up, split, curves, confusion "
            "matrix, misclassified images) in your web browser: "
            "report.html in the model folder, one file that opens offline"
        )
        self.html_btn.setEnabled(False)
        self.html_btn.clicked.connect(self.open_html_report)
        self._html_report: Path | None = None
        report = QWidget()
        rl = QVBoxLayout(report)
        for w in (
            self.report_label,
            self.class_table,
            self.confusion,
            self.diagnosis,
            self.html_btn,
        ):
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
        layout.addWidget(self.device)
        buttons = QHBoxLayout()
        buttons.addWidget(self.suggest_btn)
        buttons.addWidget(self.start_btn, 1)
        layout.addLayout(buttons)
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
        self._restore_settings(dataset, out_dir)
        self.form.changed.connect(self._save_settings)
        self.data_edit.textChanged.connect(self._save_settings)
        self.out_edit.textChanged.connect(self._save_settings)

    # -- remembered across sessions ------------------------------------------------------
    def _restore_settings(self, dataset, out_dir) -> None:
        """The folders and settings of the last session (``_settings``); folders given to
        the constructor (or Annotate's dataset) come first."""
        saved = _settings.load("train")
        for name, value in (saved.get("form") or {}).items():
            widget = getattr(self.form, name, None)
            if widget is None or value is None:
                continue
            with contextlib.suppress(ValueError, TypeError):  # another version's: the default
                widget.value = value
        if dataset is None and SESSION.dataset is None and saved.get("dataset"):
            self.data_edit.setText(str(saved["dataset"]))
        if out_dir is None and saved.get("model"):
            self.out_edit.setText(str(saved["model"]))

    def _save_settings(self, *_) -> None:
        form = {w.name: str(w.value) if isinstance(w, FileEdit) else w.value for w in self.form}
        folders = {
            key: str(Path(edit.text().strip()).expanduser().absolute())
            for key, edit in (("dataset", self.data_edit), ("model", self.out_edit))
            if edit.text().strip()
        }  # absolute: napari may start elsewhere next time
        _settings.save("train", {**folders, "form": form})

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

    def _update_note(self, *_) -> None:
        """Say what the model starts from; offer the fine-tuning phases only where they run."""
        f = self.form
        words = backbone_choices(f.backbone.value, f.weights.value)
        combo = f.backbone.native  # each backbone's words: the one that will be used
        text_of = {value: text for text, value in words}
        for i in range(combo.count()):
            combo.setItemText(i, text_of.get(combo.itemData(i), combo.itemText(i)))
        text, level = weights_note(f.backbone.value, f.weights.value, f.fine_tune.value)
        self.note.setText(text)
        self.note.setStyleSheet("color: #ffbf5f;" if level == "warning" else "")
        self.note.setToolTip(f"The Keras cache: {keras_home() / 'models' / IMAGENET_FILE}")
        # two phases (head first, then the unfrozen stages) need a pretrained, unfrozen base
        two_phase = f.fine_tune.value != 0 and f.weights.value != "none"
        for name in (
            "head_epochs",
            "fine_tune_lr_factor",
            "fine_tune_epochs",
            "fine_tune_schedule",
            "label_smoothing",
            "time_budget",
        ):
            getattr(f, name).enabled = two_phase

    def apply_settings(self, settings: dict) -> None:
        """Set form fields from a dict of TrainConfig values (each stays editable)."""
        for name, value in settings.items():
            getattr(self.form, name).value = "" if value is None else value  # text: unset

    def suggest(self):
        """Count the dataset's images in a worker, then apply the guide's settings for that
        size (:func:`core.train.suggest_settings`); returns the worker (None if refused).

        Counting opens every file for its page count: about 0.4 ms a file on a local disk
        (1.3 s for 3,000), far more on a network share, so it does not run in the GUI thread.
        """
        from napari.qt.threading import thread_worker

        if self._counting is not None or self.state is not State.IDLE:
            return None
        data_dir = str(Path(self.data_edit.text().strip()).expanduser())
        worker = thread_worker(_count_job)(data_dir)
        worker.returned.connect(self._on_counted)
        worker.finished.connect(self._counting_done)
        self._counting = worker
        self.suggest_btn.setEnabled(False)
        self._say(f"Counting the images in {data_dir}...")
        worker.start()
        return worker

    def _on_counted(self, n) -> None:
        if isinstance(n, Failed):
            from napari.utils.notifications import show_error

            self._say(f"Cannot suggest settings: {n.message}")
            show_error(f"Cannot suggest settings: {n.message}")
            return
        preset: Preset = suggest_settings(n)
        if self.state is not State.IDLE:  # a training started meanwhile: leave its form alone
            self._say(f"{preset.text} Not applied: a training is running.")
            return
        self.apply_settings(preset.settings)
        text = preset_text(self.form, preset)
        self._say(text)
        self._append(text)

    def _counting_done(self) -> None:
        self._counting = None
        self.suggest_btn.setEnabled(self.state is State.IDLE)

    def config(self) -> TrainConfig:
        """The form as a TrainConfig; a ValueError says which setting is wrong."""
        return TrainConfig(
            data_dir=str(Path(self.data_edit.text().strip()).expanduser()),
            out_dir=str(Path(self.out_edit.text().strip() or DEFAULT_MODEL).expanduser()),
            **form_settings(self.form),
        )

    # -- start / stop --------------------------------------------------------------------
    def toggle(self) -> None:
        if self.state is State.IDLE:
            self.start()
        elif self.state is State.RUNNING:
            self.stop()

    def _set_state(self, state: State) -> None:
        self.state = state
        self.start_btn.setText(
            {State.IDLE: "Start training", State.RUNNING: "Stop", State.STOPPING: "Stopping..."}[
                state
            ]
        )
        self.start_btn.setEnabled(state is not State.STOPPING)
        self.form.enabled = state is State.IDLE
        self.suggest_btn.setEnabled(state is State.IDLE and self._counting is None)
        self.data_edit.setEnabled(state is State.IDLE)
        self.out_edit.setEnabled(state is State.IDLE)

    def start(self):
        """Check the set-up, then train in a worker; returns the worker (None if refused)."""
        from napari.qt.threading import thread_worker

        from ..core.model import normalize_weights

        if self.state is not State.IDLE:
            return None
        try:
            config = self.config()  # a setting's ValueError names the setting
            normalize_weights(config.weights)
        except (MicroclfError, ValueError) as exc:
            self._fail(str(exc))
            return None
        try:  # the folders here; the worker's preflight checks every image
            check_folders(config)
        except MicroclfError as exc:
            self._fail(str(exc))
            return None
        self._reset_panel(config)
        self._ended = False
        self._stop = threading.Event()
        worker = thread_worker(_train_job, ignore_errors=True)(config, self._stop)
        worker.yielded.connect(self._on_update)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        worker.errored.connect(self._on_error)
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
        """A problem the user can fix: one line in the status, the Log tab and a
        notification (a list of bad images: its first line, the list in the Log tab)."""
        from napari.utils.notifications import show_error

        first, *rest = message.splitlines()
        line = f"Cannot train: {first.rstrip(':')}" + (" (listed in the Log tab)" if rest else "")
        self._append(f"Cannot train: {message}")
        self._say(line)
        show_error(line)
        if rest:
            self.tabs.setCurrentWidget(self.log)

    def _on_error(self, exc: BaseException) -> None:
        """An unexpected error (a bug): its traceback in the Log tab, and napari's error
        notification, whose details (and napari's console) show the traceback too."""
        from napari.utils.notifications import notification_manager

        if self._after_flush(self._on_error, exc):
            return
        self._end_run()
        if isinstance(exc, WorkerError) and exc.__cause__ is not None:
            exc = exc.__cause__  # a RuntimeError, carried past superqt under another type
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._append(
            f"Training failed with an unexpected error (a bug in microclf; please "
            f"report it with this traceback):\n{text}"
        )
        self.tabs.setCurrentWidget(self.log)
        self._say(f"Training failed: {type(exc).__name__}: {exc} (traceback in the Log tab)")
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)

    # -- the live panel ------------------------------------------------------------------
    def _reset_panel(self, config: TrainConfig) -> None:
        self.result = None
        self.history = {}
        self._log_lines, self._status, self._bars = [], None, {}
        self._curves_due, self._curves_at = False, 0.0
        self.log.clear()
        self.curves.plot({})
        self.tabs.setCurrentWidget(self.log)
        self._close_pbars()
        self.batches_pbar = None
        self.epochs_pbar = self._pbars["epochs"] = stoppable_progress(
            most_epochs(config), "Training epochs", self.stop
        )

    def _batch_pbar(self, total: int, desc: str):
        """The bar of the batches (or of a preparation step), under the epochs' bar: one bar
        for the whole training, reset at each epoch.

        Not ``nest_under`` the epochs: napari 0.9.2's activity dock crashes (a segmentation
        fault) when nested bars close, its ``destroyed`` handler walking the group's
        children while Qt deletes them; two plain bars, both cancelable, close safely."""
        if "batches" not in self._pbars:
            self._pbars["batches"] = None  # making a bar runs the event loop: no second one
            pbar = self.batches_pbar = self._pbars["batches"] = stoppable_progress(
                total, desc, self.stop
            )
            return pbar
        pbar = self._pbars["batches"]
        if pbar is None:  # being made (an update that came in meanwhile)
            return None
        pbar.n = 0
        pbar.total = total  # emits napari's total event
        pbar.events.value(value=0)
        pbar.set_description(desc)
        return pbar

    def _close_pbars(self, *names) -> None:
        for name in names or ("batches", "epochs"):
            pbar = self._pbars.pop(name, None)
            if pbar is not None:
                pbar.close()

    def _append(self, text: str, warning: bool = False) -> None:
        self.log.appendPlainText(("Warning: " if warning else "") + text)

    def _on_update(self, u) -> None:
        """Take an update from the training: only noted here (cheap), shown by :meth:`_flush`
        at most every UPDATE_MS. Updates after the run's end (one queued before it, delivered
        late) are ignored: the status line ends on the final state."""
        if u is None or self._ended:
            return
        if isinstance(u, Message):
            self._log_lines.append(("Warning: " if u.level == "warning" else "") + u.text)
        elif isinstance(u, PhaseStart):
            self._log_lines.append(u.text)
            self._status = u.text
        elif isinstance(u, Progress):
            self._status = u.text
            self._bars["batches"] = (PHASES.get(u.phase, u.phase), u.done, max(u.total, 1))
        elif isinstance(u, EpochStart):
            self._log_lines.append(u.text)
            self._status = f"{u.text}..."
            self._bars["batches"] = (u.text, 0, 1)
        elif isinstance(u, BatchEnd):
            desc = self._bars.get("batches", (None,))[0]
            self._bars["batches"] = (desc, u.batch, u.steps)
            logs = " - ".join(
                f"{k}: {v:.4f}" for k, v in u.logs.items() if k in ("loss", "accuracy", "macro_f1")
            )
            self._status = f"Epoch {u.epoch}/{u.epochs} - batch {u.batch}/{u.steps} - {logs}"
        elif isinstance(u, EpochEnd):
            self._log_lines.append(u.text)
            self.history = u.history
            # early stopping and phase 2 settle the total as they go
            self._bars["epochs"] = (None, u.epoch, u.epochs)
            self._curves_due = True
        if "batches" in self._bars and "batches" not in self._pbars:
            self._flush()  # the batches' bar at once: Cancel in the activity dock from the start
        elif not self._flush_timer.isActive():
            self._flush_timer.start(UPDATE_MS)

    def _flush(self, final: bool = False) -> None:
        """Show the updates noted since the last flush: the log lines in one go, the newest
        status and bar positions, and the curves when CURVES_S passed since their last
        redraw (or ``final``).

        Making a napari progress bar runs the event loop, which may deliver newer updates
        and a flush inside this one: that inner flush only asks for another round, so an
        older snapshot is never shown after a newer one (a bar left at epoch 22 of 25)."""
        if self._ended:
            return
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            self._flush_again = True
            while self._flush_again and not self._ended:
                self._flush_again = False
                self._flush_once(final)
        finally:
            self._flushing = False

    def _flush_once(self, final: bool) -> None:
        lines, self._log_lines = self._log_lines, []
        status, self._status = self._status, None
        bars, self._bars = self._bars, {}
        if lines:
            self.log.appendPlainText("\n".join(lines))
        if status is not None and self.state is State.RUNNING:  # "Stopping..." stays
            self._say(status)
        for name, (desc, n, total) in bars.items():
            pbar = self._pbars.get(name)
            if name == "batches" and desc is not None and (pbar is None or str(pbar.desc) != desc):
                pbar = self._batch_pbar(total, desc)  # may run the event loop
            if pbar is not None:
                self._move(pbar, n, total)
        if self._curves_due:
            wait = self._curves_at + CURVES_S - time.perf_counter()
            if final or wait <= 0:
                first = not self._curves_at
                self._curves_due, self._curves_at = False, time.perf_counter()
                self.curves.plot(self.history)
                if first:
                    self.tabs.setCurrentWidget(self.curves)
            elif not self._flush_timer.isActive():
                self._flush_timer.start(int(wait * 1000) + 1)

    def _end_run(self) -> None:
        """Show what the run sent until its end, then take no more of its updates."""
        self._flush_timer.stop()
        self._flush(final=True)
        self._ended = True

    @staticmethod
    def _move(pbar, n: int, total: int | None = None) -> None:
        """Move a napari bar to ``n`` (of ``total``, when given)."""
        if total is not None and pbar.total != total:
            pbar.total = total
        if n != pbar.n:
            pbar.update(n - pbar.n)

    def _after_flush(self, handler, *args) -> bool:
        """True when a flush is under way (this signal came in through the event loop a bar
        ran inside it): ``handler(*args)`` then runs right after it, in order."""
        if not self._flushing:
            return False
        QTimer.singleShot(0, lambda: handler(*args))
        return True

    def _on_returned(self, result) -> None:
        from napari.utils.notifications import show_info

        if self._after_flush(self._on_returned, result):
            return
        self._end_run()
        if isinstance(result, Failed):
            self._fail(result.message)
            return
        self.result = result
        if result.stopped:
            self._say(f"Stopped after {result.epochs_run} epoch(s); no model was written.")
            return
        self.history = result.history
        # the report first: its tab hides the curves, drawn again when shown (one draw less
        # in the event loop at the end)
        self.show_report(result.report or {}, result.bundle, result.meta)
        self.curves.plot(result.history)  # the final history, its phases complete
        SESSION.set_bundle(result.bundle)
        report = result.report or {}
        acc, bal = report.get("accuracy"), report.get("balanced_accuracy")
        self._say(
            f"Done in {result.seconds:.0f}s: model saved to {result.bundle}"
            + (f"; test accuracy {acc:.1%}" if acc is not None else "")
            + (
                f", balanced {bal:.1%}, macro-F1 {report['macro_f1']:.2f}"
                if bal is not None
                else ""
            )
            + "."
        )
        show_info(f"Model saved to {result.bundle}; the Predict widget will use it.")

    def _on_finished(self) -> None:
        if self._after_flush(self._on_finished):
            return
        self._end_run()
        self._close_pbars()
        self._set_state(State.IDLE)
        self.worker = None

    def show_report(self, report: dict, bundle=None, meta: dict | None = None) -> None:
        """Test accuracy (images and sources), the model's start, per-class table, confusion
        matrix and the diagnosis."""
        from html import escape

        names = report.get("class_names", [])
        meta = meta or {}
        self.report, self.report_bundle = (report if names else None), bundle
        if report.get("n"):
            head = (
                f"<b style='font-size:14pt'>Test accuracy {report['accuracy']:.1%}</b> "
                f"on {report['n']} images{self._from_groups(report, meta)}, never seen in "
                "training."
            )
            if report.get("balanced_accuracy") is not None:
                head += (
                    f"<br>Balanced accuracy {report['balanced_accuracy']:.1%} (the mean recall "
                    f"of the classes), macro-F1 {report['macro_f1']:.2f}."
                )
            few = few_test_images(report["n"])
            if few:
                head += f"<br><i>{escape(few)}</i>"
            tta = report.get("tta") or {}
            if tta.get("accuracy") is not None:
                head += (
                    f" With flips (test-time augmentation, Predict's option): "
                    f"{tta['accuracy']:.1%}."
                )
        else:
            head = "<b>No test images</b>: raise the test split or add images."
        start = model_start(meta)
        if start:
            head += f"<br>Model: {escape(start)}"
        if bundle is not None:
            head += f"<br>Saved in {escape(str(bundle))} (report.md inside)"
        self.report_label.setText(head)
        rows = report.get("per_class", [])
        cm = report.get("confusion_matrix")
        self.class_table.setRowCount(len(rows))
        for r, c in enumerate(rows):
            predicted = None
            if cm is not None and c["class"] in names:  # test images predicted as the class
                predicted = sum(row[names.index(c["class"])] for row in cm)
            for col, text in enumerate(class_row(c, predicted)):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignCenter)
                if text == NA:
                    item.setToolTip(
                        "No test images of this class"
                        + (" and none predicted as it" if col == 1 else "")
                        + ": nothing to measure."
                    )
                self.class_table.setItem(r, col, item)
        if names and report.get("confusion_matrix") is not None:
            self.confusion.plot(report["confusion_matrix"], names)
        items = "".join(
            f"<li><b>{escape(f['finding'])}</b>: {escape(f['evidence'])}.<br>"
            f"<i>What to do:</i> {escape(f['remedy'])}</li>"
            for f in report.get("diagnosis", [])
        )
        self.diagnosis.setText(f"<b>Diagnosis</b><ul>{items}</ul>" if items else "")
        from ..core.report_html import REPORT_HTML

        html = Path(bundle) / REPORT_HTML if bundle is not None else None
        self._html_report = html if html is not None and html.is_file() else None
        self.html_btn.setEnabled(self._html_report is not None)
        self.tabs.setCurrentIndex(3)

    def review_cell(self, true: str, predicted: str):
        """Open the images of a confusion-matrix cell in the Review widget (docked on first
        use); returns that widget's worker, or None."""
        from .review import review_dock

        if self.report is None:
            return None
        review = review_dock(self.viewer)
        if review is None:
            return None
        review.load(self.report, self.report_bundle)
        return review.open_cell(true, predicted)

    def open_html_report(self) -> bool:
        """Open the model's report.html in the web browser; False (and a notification) when
        it cannot be opened."""
        from napari.utils.notifications import show_error
        from qtpy.QtCore import QUrl
        from qtpy.QtGui import QDesktopServices

        path = self._html_report
        if path is None or not path.is_file():
            show_error(
                f"No HTML report to open{f' ({path} is gone)' if path else ''}: train "
                "a model, or write it with `microclf report MODEL`."
            )
            return False
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(path))):
            show_error(f"Could not start a web browser; open {path} in one.")
            return False
        return True

    @staticmethod
    def _from_groups(report: dict, meta: dict) -> str:
        """' from 12 sources' (grouped by source file) or ' from 12 groups' (by a pattern)."""
        n = report.get("groups")
        if not n:
            return ""
        by_pattern = (meta.get("config") or {}).get("group_by")
        word = "group" if by_pattern else "source"
        return f" from {n} {word}{'' if n == 1 else 's'}"

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def closeEvent(self, event):
        self._stop.set()
        super().closeEvent(event)
