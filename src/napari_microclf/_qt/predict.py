"""Predict: classify image layers (every page of a stack) and folders with a trained model.

Per image layer the results are

- drawn on the canvas by a Points layer ``"<layer> classes"`` with one text point per page,
  at the image's top-left corner: napari shows a point only on its own slice, so the label
  follows the dims slider through a stack. A label follows its image: hidden with it,
  removed with it, renamed with it (the results follow the new name). Labels of several
  images never overlap: each sits at its image's top edge or, where another label is there
  already, one text line lower, the line height taken at the current zoom
  (:meth:`PredictWidget.label_boxes`);
- for the active classified layer, written in a canvas overlay (``"<layer> page 3:
  fragmented 0.97"``) that stays readable at any zoom and follows the slider and threshold;
- plotted along a stack (probabilities per page, linked with the slider) in a dock under the
  viewer (``stackplot.StackPlot``), opened when a stack is classified or by "Plot along
  stack";
- stored on the image layer in ``metadata["microclf"]["predictions"]`` (model, class names,
  per page class, confidence and probabilities) and on the Points layer as ``features``;
- listed in the results table, which exports to CSV in the ``microclf predict`` format
  (its ``file`` column holds the layer name).

**Explain** adds, per chosen layer, an image layer ``"<layer> Grad-CAM"``: where the model
looks (``core.explain``), page by page, on the source's pixels (same scale and translate).

The model is loaded once per bundle (and reloaded only when the bundle is rewritten).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import MicroclfError
from ..core.evaluate import describe_model
from ..core.images import ImageReadError, count_pages
from ..core.model import MODEL_FILE, BundleError, read_meta
from ..core.predict import (
    PagePrediction,
    Predictor,
    check_csv_destination,
    find_images,
    iter_folder,
    one_line,
    write_csv,
)
from . import _layers, _settings
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._tf import ensure_tensorflow
from ._worker import stoppable_progress, surfaced
from .export import ExportRow

ERRORS = (BundleError, ImageReadError, ValueError, OSError)
UNCERTAIN = "uncertain"

LABEL_TEXT = "{label} ({confidence:.2f}) · "  # a page's label on the canvas, + layer name
LABEL_SIZE = 12  # its font size
LINE_PX = 2 * LABEL_SIZE  # screen pixels per label line: the text and a gap
CHAR_PX = 0.75 * LABEL_SIZE  # screen pixels per character, generously
OVERLAY = "microclf_in_view"  # key of the text overlay in viewer.canvas.overlays
PLOT_NAME = "Probabilities along stack"

CACHE_SIZE = 2  # loaded models kept; the least recently used one is dropped beyond this
_CACHE: OrderedDict[tuple, Predictor] = OrderedDict()
_CACHE_LOCK = threading.Lock()
LOADS = {"n": 0}  # how many times a model was loaded (the tests read it)


# The Predict widget's engine choices (see core/engine.py): label -> (engine, precision)
ENGINE_CHOICES = (
    ("auto: OpenVINO if installed, else TensorFlow", ("auto", "f32")),
    ("OpenVINO (fp32)", ("openvino", "f32")),
    ("OpenVINO bf16: faster, approximate", ("openvino", "bf16")),
    ("OpenVINO int8: fastest, approximate", ("openvino", "int8")),
    ("TensorFlow", ("tensorflow", "f32")),
)


def get_predictor(bundle: str | Path, engine: str = "auto", precision: str = "f32") -> Predictor:
    """The Predictor of ``bundle`` on ``engine`` at ``precision``, loaded once and reused
    until the bundle is rewritten."""
    folder = Path(bundle).expanduser().resolve()
    model = folder / MODEL_FILE
    # the files' identity, not just a time: a restored model.keras is another file whose
    # time may equal the replaced one's
    files = (folder,) if folder.is_file() else (model, folder / "microclf.json")  # a .zip
    key = (str(folder), engine, precision) + tuple(
        (st.st_ino, st.st_mtime_ns, st.st_size) if (st := _stat(f)) else None for f in files
    )
    with _CACHE_LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[0] == key[0]]:
                del _CACHE[old]
            _CACHE[key] = Predictor(folder, engine=engine, precision=precision)
            LOADS["n"] += 1
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return _CACHE[key]


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


def forget_model(bundle: str | Path) -> None:
    """Drop the loaded model of ``bundle`` from the cache (it was replaced or restored)."""
    folder = str(Path(bundle).expanduser().resolve())
    with _CACHE_LOCK:
        for old in [k for k in _CACHE if k[0] == folder]:
            del _CACHE[old]


def _notify(kind: str, text: str) -> None:
    from napari.utils import notifications

    getattr(notifications, f"show_{kind}")(text)


@surfaced
def _predict_layers(
    bundle: str,
    sources: list,
    tta: bool = False,
    stop: threading.Event | None = None,
    engine: str = "auto",
    precision: str = "f32",
):
    """Worker: yields ``(layer name, PagePrediction)`` for every page of every source; ``stop``
    set ends it after the current batch (the pages classified so far are yielded)."""
    stop = stop or threading.Event()
    try:
        predictor = get_predictor(bundle, engine, precision)
    except ERRORS as exc:
        return str(exc)
    yield ("__model__", predictor.class_names)
    for src in sources:
        if stop.is_set():
            break
        items = ((src.name, p, src.page(p)) for p in range(src.n_pages))
        try:
            for pred in predictor.predict_pages(items, stop.is_set, tta=tta):
                yield (src.name, pred)
        except ERRORS as exc:
            return f"{src.name}: {exc}"
    return None


_EXPLAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Predictor -> Explainer
PREDICTED = "predicted class"


@surfaced
def _explain_layers(
    bundle: str, sources: list, class_name: str | None, stop: threading.Event | None = None
):
    """Worker: yields ``(layer name, Explanation)`` for every page of every source, until
    ``stop`` is set."""
    from ..core.explain import Explainer

    stop = stop or threading.Event()
    try:
        predictor = get_predictor(bundle)
        explainer = _EXPLAINERS.get(predictor)
        if explainer is None:
            explainer = _EXPLAINERS[predictor] = Explainer(predictor.bundle)
    except ERRORS as exc:
        return str(exc)
    for src in sources:
        if stop.is_set():
            break
        items = ((p, src.page(p)) for p in range(src.n_pages))
        try:
            for e in explainer.explain_pages(items, class_name, stop.is_set):
                yield (src.name, e)
        except ERRORS as exc:
            return f"{src.name}: {one_line(exc)}"
    return None


def _page_count(path: Path) -> int:
    """Pages of ``path`` for the progress bar; a file that cannot be opened counts once (its
    error row)."""
    try:
        return count_pages(path)
    except (MicroclfError, OSError, ValueError):
        return 1


@surfaced
def _predict_folder(
    bundle: str,
    folder: str,
    csv_path: str,
    threshold: float,
    tta: bool = False,
    stop: threading.Event | None = None,
    engine: str = "auto",
    precision: str = "f32",
):
    """Worker: classifies every image under ``folder`` past bad files, the rows streamed to
    the CSV (see ``core.predict.predict_folder``). Yields ``("total", pages)``, then
    ``("done", n)`` per page or bad file; returns the FolderResult, or one line for our
    errors (an unexpected one raises and reaches napari's notification with its traceback).
    ``stop`` set ends the run after the current batch: its FolderResult is ``stopped`` and
    the rows so far stay in ``<csv>.partial``.
    """
    stop = stop or threading.Event()
    try:
        predictor = get_predictor(bundle, engine, precision)
        files = find_images([folder])
    except MicroclfError as exc:
        return f"Classify folder: {one_line(exc)}"
    yield ("total", sum(_page_count(p) for p in files))
    if stop.is_set():
        return f"Classify folder: stopped before the first page; nothing written to {csv_path}."
    run = iter_folder(
        predictor, files, csv_path, threshold=threshold, tta=tta, should_stop=stop.is_set
    )
    done = 0
    try:
        while True:
            try:
                next(run)
            except StopIteration as end:
                return end.value
            done += 1
            yield ("done", done)
    except MicroclfError as exc:
        return f"Classify folder: {one_line(exc)}"
    finally:
        run.close()  # stopped or failed: the rows so far stay in the .partial CSV


def model_identity(meta: dict) -> str:
    """'efficientnet-lite0 · imagenet 579344248a93': the backbone, how its weights started and
    the first 12 characters of their digest (``weights_id``). Bundles older than backbones
    have neither key: they are EfficientNetB0 with ``meta["weights"]``."""
    backbone = meta.get("backbone") or "efficientnet-b0"
    weights_id = str(meta.get("weights_id") or "")
    if weights_id:
        # "<backbone>:imagenet-sha256-<hex>", ":file-sha1-<hex>" or ":random-seed-<n>"
        kind, _, digest = weights_id.split(":", 1)[-1].rpartition("-")
        kind = kind.removesuffix("-sha256").removesuffix("-sha1")
        if kind.startswith("random"):
            return f"{backbone} · random start"
        if not all(c in "0123456789abcdef" for c in digest):  # e.g. "download"
            digest = ""
        return f"{backbone} · {kind} {digest[:12]}".rstrip()
    weights = str(meta.get("weights") or "none")
    if weights not in ("imagenet", "none"):
        weights = Path(weights).name
    return f"{backbone} · {weights}"


class PredictWidget(QWidget):
    """Model picker, layer choice, Run, labels on the canvas, results table, CSV, folders."""

    def __init__(self, napari_viewer, bundle: str | Path | None = None):
        super().__init__()
        ensure_tensorflow()
        self.viewer = napari_viewer
        self.class_names: list[str] = []
        self.results: dict[str, list[PagePrediction]] = {}  # layer name -> pages
        self.worker = None
        self._stop = threading.Event()
        self._running_btn = None  # the button that started the worker; it reads Stop meanwhile
        # napari's progress bar of the current run (Cancel in the activity dock stops it);
        # after the run, the closed bar of the last one (what it reached stays readable)
        self.pbar = None

        self.bundle_edit = QLineEdit(str(bundle or SESSION.last_bundle or ""))
        self.bundle_edit.setPlaceholderText("model folder (train one with the Train widget)")
        self.bundle_edit.setToolTip(
            "A model folder written by Train (model.keras + "
            "microclf.json); the last trained model is preselected."
        )
        self.bundle_edit.editingFinished.connect(self._show_model)
        bundle_row = folder_row(self.bundle_edit, "Model folder", self)
        self.restore_btn = QPushButton("Restore previous")
        self.restore_btn.setToolTip(
            "Make the model this folder had before its last training "
            "the active one again (the current one is kept as "
            "previous, so a second click switches back)."
        )
        self.restore_btn.clicked.connect(lambda: self.restore_previous_model())
        bundle_row.addWidget(self.restore_btn)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        connect_widget(SESSION.bundle_trained, self, "set_bundle")

        self.layer_list = QListWidget()
        self.layer_list.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.layer_list.setToolTip(
            "Image layers to classify: click one, Ctrl/Shift-click several, or use All."
        )
        self.layer_list.setMaximumHeight(110)
        all_btn = QPushButton("All")
        all_btn.clicked.connect(self.layer_list.selectAll)
        layer_row = QHBoxLayout()
        layer_row.addWidget(self.layer_list, 1)
        layer_row.addWidget(all_btn, 0, Qt.AlignTop)

        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip(
            "Below this confidence a page reads 'uncertain'. A page "
            "unlike the model's training images reads 'unfamiliar' "
            "whatever its confidence (its score is above 1)."
        )
        self.threshold.valueChanged.connect(self._relabel)
        self.tta = QCheckBox("Average over flips (test-time augmentation)")
        self.tta.setToolTip(
            "Classify each page and its horizontal, vertical and double flips "
            "and average the probabilities: steadier on orientation-free "
            "images, 4x the time. The training report shows what it does to "
            "the test accuracy."
        )

        self.engine = QComboBox()
        for label, choice in ENGINE_CHOICES:
            self.engine.addItem(label, choice)
        self.engine.setToolTip(
            "What runs the model. OpenVINO (fp32) gives TensorFlow's probabilities within "
            "1e-4, faster on a CPU. bf16 (on CPUs with bf16 instructions) and int8 "
            "(quantized once, calibrated on the model's training images; needs nncf) are "
            "faster still, with other probabilities: the top class can change on borderline "
            "pages (docs/performance.md gives the measured agreement). Training always runs "
            "on TensorFlow."
        )

        stop_tip = (
            " While it runs, this button stops it (as Cancel in napari's activity "
            "dock does); what was done is kept."
        )
        self.run_btn = QPushButton(self.RUN)
        self.run_btn.setToolTip("Classify every page of the chosen layers." + stop_tip)
        self.run_btn.clicked.connect(lambda: self._clicked(self.run))
        self.folder_btn = QPushButton(self.FOLDER)
        self.folder_btn.setToolTip(
            "Classify every image (and stack page) in a folder and its "
            "sub-folders into a CSV file, without opening them." + stop_tip
        )
        self.folder_btn.clicked.connect(lambda: self._clicked(self.classify_folder))
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.folder_btn)
        self.explain_btn = QPushButton("Explain")
        self.explain_btn.setToolTip(
            "Where the model looks (Grad-CAM): adds a heatmap layer '<layer> Grad-CAM' over "
            "each chosen layer, every page of a stack; bright = strongest evidence for the "
            "class." + stop_tip
        )
        self.explain_btn.clicked.connect(lambda: self._clicked(self.explain))
        self.explain_class = QComboBox()
        self.explain_class.setToolTip(
            "The class whose evidence the heatmap shows: each "
            "page's predicted class, or one chosen class."
        )
        self.explain_class.addItem(PREDICTED)
        explain_row = QHBoxLayout()
        explain_row.addWidget(self.explain_btn)
        explain_row.addWidget(QLabel("for"))
        explain_row.addWidget(self.explain_class, 1)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.in_view = QLabel("")
        self.in_view.setWordWrap(True)
        self.in_view.setStyleSheet("font-weight: bold;")

        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["layer", "page", "class", "confidence", "unfamiliar"])
        self.table.horizontalHeaderItem(4).setToolTip(
            "Distance from the training images over the model's threshold: above 1 the page "
            "is unlike them (blank: a model trained before this score existed)."
        )
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setMinimumHeight(180)
        self.table.cellDoubleClicked.connect(self._go_to_row)
        self.export_btn = QPushButton("Export CSV...")
        self.export_btn.clicked.connect(lambda: self.export_csv())
        self.plot_btn = QPushButton("Plot along stack")
        self.plot_btn.setToolTip(
            "Class probabilities per page of the active classified stack, "
            "in a dock under the viewer; click a page to show it."
        )
        self.plot_btn.clicked.connect(lambda: self.show_plot())
        self.plot = None  # the StackPlot, made by show_plot
        result_row = QHBoxLayout()
        result_row.addWidget(self.export_btn)
        result_row.addWidget(self.plot_btn)

        form = QFormLayout()
        form.addRow("Model", bundle_row)
        form.addRow(self.model_info)
        # share the model: bioimage.io package, SavedModel, ONNX or one zip (docs/export.md)
        self.export_row = ExportRow(self)
        form.addRow(self.export_row)
        form.addRow("Image layers", layer_row)
        form.addRow("Confidence threshold", self.threshold)
        form.addRow(self.tta)
        form.addRow("Engine", self.engine)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addLayout(explain_row)
        layout.addWidget(self.status)
        layout.addWidget(self.in_view)
        layout.addWidget(self.table, 1)
        layout.addLayout(result_row)

        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_layers)
        events.removed.connect(self._on_removed)
        self._linked: dict[int, str] = {}  # id(image layer) -> its name in self.results
        self._boxes: dict[str, tuple] = {}  # see label_boxes
        self.viewer.dims.events.current_step.connect(self._update_in_view)
        self.viewer.layers.selection.events.active.connect(self._update_in_view)
        self._camera().events.zoom.connect(self._place_labels)
        self._refresh_layers()
        saved = self._restore_settings(bundle)
        self._show_model()
        if self.explain_class.findText(str(saved.get("explain_class"))) >= 0:
            self.explain_class.setCurrentText(str(saved["explain_class"]))
        self.bundle_edit.textChanged.connect(self._save_settings)
        self.threshold.valueChanged.connect(self._save_settings)
        self.tta.toggled.connect(self._save_settings)
        self.engine.currentIndexChanged.connect(self._save_settings)
        self.explain_class.currentTextChanged.connect(self._save_settings)

    # -- remembered across sessions --------------------------------------------------------
    def _restore_settings(self, bundle) -> dict:
        """The model folder and options of the last session (``_settings``); a model given to
        the constructor, or the one Train just wrote, comes first."""
        saved = _settings.load("predict")
        if bundle is None and SESSION.last_bundle is None and saved.get("model"):
            self.bundle_edit.setText(str(saved["model"]))
        if isinstance(saved.get("threshold"), int | float):
            self.threshold.setValue(float(saved["threshold"]))
        self.tta.setChecked(bool(saved.get("tta", False)))
        labels = [label for label, _ in ENGINE_CHOICES]
        if saved.get("engine") in labels:
            self.engine.setCurrentIndex(labels.index(saved["engine"]))
        return saved

    def _save_settings(self, *_) -> None:
        model = str(Path(self.bundle()).expanduser().absolute()) if self.bundle() else ""
        _settings.save(
            "predict",
            {
                "model": model,
                "threshold": self.threshold.value(),
                "tta": self.tta.isChecked(),
                "engine": self.engine.currentText(),
                "explain_class": self.explain_class.currentText(),
            },
        )

    def engine_choice(self) -> tuple[str, str]:
        """``(engine, precision)`` of the Engine row."""
        return tuple(self.engine.currentData())

    # -- model ---------------------------------------------------------------------------
    def bundle(self) -> str:
        return self.bundle_edit.text().strip()

    def set_bundle(self, path) -> None:
        self.bundle_edit.setText(str(path))
        self._show_model()

    def restore_previous_model(self) -> dict | None:
        """Swap the model folder's ``previous/`` back in (``microclf restore``); the next run
        loads the restored model. Returns its metadata (None when refused)."""
        from ..core.errors import MicroclfError
        from ..core.model import describe_bundle, restore_previous

        if self.worker is not None:
            _notify("warning", "Wait for the running prediction to finish, then restore.")
            return None
        try:
            meta = restore_previous(self.bundle())
        except MicroclfError as exc:
            _notify("error", f"Cannot restore: {exc}")
            return None
        finally:
            forget_model(self.bundle())
        self._show_model()
        _notify("info", f"Restored the previous model: {describe_bundle(meta)}")
        return meta

    def _show_model(self) -> None:
        from ..core.model import has_previous

        self._fill_explain_classes()
        self.restore_btn.setEnabled(bool(self.bundle()) and has_previous(self.bundle()))
        self.export_row.set_model(None)
        if not self.bundle():
            self.model_info.setText(
                "No model yet: train one with the Train widget or pick a model folder."
            )
            return
        try:
            meta = read_meta(self.bundle())
        except BundleError as exc:
            self.model_info.setText(str(exc))
            return
        self.export_row.set_model(self.bundle())
        acc = (meta.get("metrics") or {}).get("accuracy")
        self.model_info.setText(
            f"Classes: {', '.join(meta['class_names'])}"
            + (f"; test accuracy {acc:.0%}" if acc is not None else "")
            + (f"; trained {meta['date'][:16].replace('T', ' ')}" if meta.get("date") else "")
            + f"\nModel: {model_identity(meta)}"
        )
        self.model_info.setToolTip(
            f"{describe_model(meta)}\nWeights identity: "
            f"{meta.get('weights_id') or 'not recorded (older model)'}"
        )

    # -- layers --------------------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        chosen = set(self.chosen_names())
        names = [lyr.name for lyr in _layers.image_layers(self.viewer)]
        self.layer_list.clear()
        self.layer_list.addItems(names)
        for i, name in enumerate(names):
            self.layer_list.item(i).setSelected(name in chosen)

    def chosen_names(self) -> list[str]:
        return [item.text() for item in self.layer_list.selectedItems()]

    def choose(self, names) -> None:
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            item.setSelected(item.text() in set(names))

    def _chosen_sources(self) -> list:
        names = self.chosen_names()
        if not names:
            active = self.viewer.layers.selection.active
            names = (
                [active.name]
                if active is not None
                and active.name in [lyr.name for lyr in _layers.image_layers(self.viewer)]
                else []
            )
        sources, seen = [], set()
        for name in names:
            src = _layers.page_source(self.viewer, self.viewer.layers[name])
            if src.name not in seen:  # channel layers of one image are classified once
                seen.add(src.name)
                sources.append(src)
        return sources

    # -- run ---------------------------------------------------------------------------
    def _ready(self) -> bool:
        """No run in progress and a model folder that looks right (else say why)."""
        if self.worker is not None:
            return False
        try:
            read_meta(self.bundle())
        except BundleError as exc:
            _notify("error", f"Cannot predict: {exc}")
            return False
        return True

    def run(self):
        """Classify the chosen layers in a worker; returns the worker (None if refused)."""
        from napari.qt.threading import thread_worker

        if not self._ready():
            return None
        sources = self._chosen_sources()
        if not sources:
            _notify("warning", "Choose an image layer to classify (or open one).")
            return None
        total = sum(s.n_pages for s in sources)
        self._progress(total, "Classifying pages")
        new: dict[str, list[PagePrediction]] = {s.name: [] for s in sources}
        bundle = self.bundle()

        def on_yield(item):
            name, value = item
            if name == "__model__":
                self.class_names = list(value)
                return
            new[name].append(value)
            self.pbar.update(1)

        def on_return(error):
            if error:
                _notify("error", f"Cannot predict: {error}")
            for name, preds in new.items():
                if preds:
                    self.results[name] = preds
                    self._store(name, bundle)
            self._fill_table()
            self._place_labels()
            self._update_in_view()
            n = sum(len(p) for p in new.values())
            text = f"Classified {n} page(s) of {len(new)} layer(s)."
            if self._stop.is_set() and n < total:
                text = (
                    f"Stopped: classified {n} of {total} page(s) of {len(new)} layer(s); "
                    "the labels show the pages classified."
                )
            self.status.setText(text)
            if any(len(p) > 1 for p in new.values()):
                self.show_plot()
            elif self.plot is not None:
                self.plot.refresh()

        worker = thread_worker(_predict_layers, ignore_errors=False)(
            bundle, sources, self.tta.isChecked(), self._stop, *self.engine_choice()
        )
        return self._start(
            worker,
            on_yield,
            on_return,
            "Loading the model..." if not _CACHE else "Classifying...",
            self.run_btn,
        )

    RUN, FOLDER, EXPLAIN, STOP = "Run", "Classify folder...", "Explain", "Stop"

    def _clicked(self, action) -> None:
        """A run button: starts its action, or stops the run it started."""
        if self.worker is not None:
            self.stop()
        else:
            action()

    def _progress(self, total: int, desc: str) -> None:
        """A new stop-able napari progress bar for the run about to start."""
        self._stop = threading.Event()
        self.pbar = stoppable_progress(total, desc, self.stop)

    def _start(self, worker, on_yield, on_return, status: str, button):
        """Wire a worker's signals, turn ``button`` into Stop and lock the others until it
        ends, and start it."""
        worker.yielded.connect(on_yield)
        worker.returned.connect(on_return)
        worker.finished.connect(self._done)
        self.worker = worker
        self._running_btn = button
        for b in (self.run_btn, self.folder_btn, self.explain_btn):
            b.setEnabled(b is button)
        button.setText(self.STOP)
        self.status.setText(status)
        worker.start()
        return worker

    def stop(self) -> None:
        """Stop the run (Run, Classify folder or Explain) after the current batch of pages;
        what was done is kept. The run's button (now Stop) or Cancel in the activity dock."""
        if self.worker is None or self._stop.is_set():
            return
        self._stop.set()
        if self._running_btn is not None:
            self._running_btn.setText("Stopping...")
            self._running_btn.setEnabled(False)
        self.status.setText("Stopping after the current pages...")

    def _done(self) -> None:
        if self.pbar is not None:
            self.pbar.close()  # kept as self.pbar: the last run's bar
        self.worker = self._running_btn = None
        for b, text in (
            (self.run_btn, self.RUN),
            (self.folder_btn, self.FOLDER),
            (self.explain_btn, self.EXPLAIN),
        ):
            b.setText(text)
            b.setEnabled(True)

    # -- explain (Grad-CAM) ----------------------------------------------------------------
    def _fill_explain_classes(self) -> None:
        """The class chooser: 'predicted class', then the model's classes (kept if still
        there)."""
        try:
            names = list(read_meta(self.bundle())["class_names"]) if self.bundle() else []
        except BundleError:
            names = []
        current = self.explain_class.currentText()
        self.explain_class.clear()
        self.explain_class.addItems([PREDICTED, *names])
        if current in names:
            self.explain_class.setCurrentText(current)

    def heatmap_name(self, name: str) -> str:
        return f"{name} Grad-CAM"

    def explain(self, class_name: str | None = None):
        """Grad-CAM of every page of the chosen layers in a worker; each gets (or updates) a
        heatmap layer aligned with it. ``class_name``: None takes the chooser's choice.
        Returns the worker (None if refused)."""
        from napari.qt.threading import thread_worker

        if not self._ready():
            return None
        sources = self._chosen_sources()
        if not sources:
            _notify("warning", "Choose an image layer to explain (or open one).")
            return None
        if class_name is None and self.explain_class.currentText() != PREDICTED:
            class_name = self.explain_class.currentText()
        total = sum(s.n_pages for s in sources)
        self._progress(total, "Grad-CAM")
        maps: dict[str, list] = {s.name: [] for s in sources}
        leads = {s.name: s.lead for s in sources}

        def on_yield(item):
            name, e = item
            maps[name].append(e.heatmap)
            self.pbar.update(1)

        def on_return(error):
            if error:
                _notify("error", f"Cannot explain: {error}")
            done = [
                name
                for name, pages in maps.items()
                if pages and len(pages) == int(np.prod(leads[name] or (1,)))
            ]
            for name in done:
                self._add_heatmap(
                    name, np.stack(maps[name]).reshape(*leads[name], *maps[name][0].shape)
                )
            which = class_name or "the predicted class"
            text = f"Grad-CAM for {which}: {len(done)} layer(s)."
            if self._stop.is_set() and len(done) < len(maps):
                text = (
                    f"Stopped: Grad-CAM for {which} of {len(done)} of {len(maps)} "
                    "layer(s) (a layer gets its heatmap when all its pages are done)."
                )
            self.status.setText(text)

        worker = thread_worker(_explain_layers, ignore_errors=False)(
            self.bundle(), sources, class_name, self._stop
        )
        return self._start(worker, on_yield, on_return, "Computing Grad-CAM...", self.explain_btn)

    def _add_heatmap(self, name: str, data: np.ndarray) -> None:
        """The heatmap layer of image layer ``name``, on its pixels (same transforms)."""
        source = self.viewer.layers[name]
        hname = self.heatmap_name(name)
        active = self.viewer.layers.selection.active
        if hname in self.viewer.layers:
            self.viewer.layers[hname].data = data
            return
        self.viewer.add_image(
            data,
            name=hname,
            colormap="inferno",
            opacity=0.5,
            blending="additive",
            contrast_limits=(0.0, 1.0),
            scale=source.scale,
            units=source.units,
            translate=source.translate,
            rotate=source.rotate,
            shear=source.shear,
            affine=source.affine,
            # in the metadata from the start: the layer lists skip heatmaps when it is added
            metadata={"microclf": {"image_layer": name, "heatmap": "grad-cam"}},
        )
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active  # keep the image active (keys 1-9)

    # -- results on layers ---------------------------------------------------------------
    def label(self, pred: PagePrediction) -> str:
        return pred.label(self.threshold.value())

    def points_name(self, name: str) -> str:
        return f"{name} classes"

    def _store(self, name: str, bundle: str) -> None:
        """Metadata on the image layer, a text Points layer following the slider."""
        layer = self.viewer.layers[name]
        preds = self.results[name]
        meta = dict(layer.metadata.get("microclf", {}))
        meta["predictions"] = {
            "model": str(Path(bundle).expanduser().resolve()),
            "class_names": self.class_names,
            "pages": [
                {
                    "page": p.page,
                    "class": p.class_name,
                    "confidence": p.confidence,
                    "probabilities": p.probabilities,
                    "unfamiliar_score": p.unfamiliar_score,
                }
                for p in preds
            ],
        }
        layer.metadata["microclf"] = meta
        coords = np.array([[*_layers.page_index(layer, p.page), 0, 0] for p in preds], float)
        features = {
            "page": [p.page for p in preds],
            "class": [p.class_name for p in preds],
            "confidence": [round(p.confidence, 4) for p in preds],
            "label": [self.label(p) for p in preds],
            "unfamiliar": [
                np.nan if p.unfamiliar_score is None else round(p.unfamiliar_score, 3)
                for p in preds
            ],
        }
        # "lower_left": the text hangs below its point (napari's y axis points down)
        text = {
            "string": self.label_template(name),
            "anchor": "lower_left",
            "size": LABEL_SIZE,
            "color": "yellow",
        }
        pname = self.points_name(name)
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
                visible=layer.visible,
            )
            pts.metadata["microclf"] = {"image_layer": name}
        self._link(layer, name)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active  # keep the image active (keys 1-9)

    def label_template(self, name: str) -> str:
        """The label's napari text template: 'fragmented (0.97) · cells.tif' (the layer's
        name tells the labels of images that lie on each other apart)."""
        return LABEL_TEXT + name.replace("{", "{{").replace("}", "}}")

    def _relabel(self, *_) -> None:
        for name, preds in self.results.items():
            pname = self.points_name(name)
            if pname in self.viewer.layers:
                pts = self.viewer.layers[pname]
                feats = pts.features.copy()
                feats["label"] = [self.label(p) for p in preds]
                pts.features = feats
                pts.refresh_text()
        self._fill_table()
        self._place_labels()  # the texts' widths changed
        self._update_in_view()
        if self.plot is not None:
            self.plot.refresh()

    # -- a label follows its image ---------------------------------------------------------
    def _label_layer(self, name: str):
        pname = self.points_name(name)
        return self.viewer.layers[pname] if pname in self.viewer.layers else None

    def _link(self, layer, name: str) -> None:
        """Follow ``layer``'s visibility, name and position with its label (once per layer)."""
        if id(layer) not in self._linked:
            layer.events.visible.connect(self._on_visible)
            layer.events.name.connect(self._on_rename)
            layer.events.scale.connect(self._place_labels)
            layer.events.translate.connect(self._place_labels)
        self._linked[id(layer)] = name

    def _unlink(self, layer) -> str | None:
        name = self._linked.pop(id(layer), None)
        if name is not None:
            layer.events.visible.disconnect(self._on_visible)
            layer.events.name.disconnect(self._on_rename)
            layer.events.scale.disconnect(self._place_labels)
            layer.events.translate.disconnect(self._place_labels)
        return name

    def _on_visible(self, event) -> None:
        name = self._linked.get(id(event.source))
        pts = self._label_layer(name) if name is not None else None
        if pts is not None:
            pts.visible = event.source.visible
        self._place_labels()
        self._update_in_view()

    def _on_rename(self, event) -> None:
        """The label layer, the heatmap layer and the results take the image's new name."""
        layer = event.source
        old, new = self._linked.get(id(layer)), layer.name
        if old is None or old == new:
            return
        self._linked[id(layer)] = new
        self.results = {new if k == old else k: v for k, v in self.results.items()}
        for old_name, new_name in (
            (self.points_name(old), self.points_name(new)),
            (self.heatmap_name(old), self.heatmap_name(new)),
        ):
            if old_name in self.viewer.layers:
                other = self.viewer.layers[old_name]
                other.metadata["microclf"] = {
                    **other.metadata.get("microclf", {}),
                    "image_layer": new,
                }
                other.name = new_name
        pts = self._label_layer(new)
        if pts is not None:
            pts.text.string = self.label_template(new)
            pts.refresh_text()
            self._place_labels()  # its width changed
        self._fill_table()
        self._update_in_view()
        if self.plot is not None:
            if self.plot.layer == old:
                self.plot.layer = new
            self.plot.refresh()

    def _on_removed(self, event) -> None:
        """A removed image takes its label layer and its results with it."""
        name = self._unlink(event.value)
        if name is not None:
            pts = self._label_layer(name)
            if pts is not None:
                self.viewer.layers.remove(pts)
            self.results.pop(name, None)
            self._fill_table()
            if self.plot is not None:
                self.plot.refresh()
        self._place_labels()
        self._update_in_view()

    def label_boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """World ``(top, left, bottom, right)`` of each label on the canvas at the current
        zoom: one text line high, as wide as its longest text (a generous estimate)."""
        return dict(self._boxes)

    def _camera(self):
        """The 2D camera (``viewer.scene.camera``; napari >= 0.9)."""
        return self.viewer.scene.camera

    def _place_labels(self, *_) -> None:
        """Each shown label at its image's top-left corner, or lower by whole text lines
        until it overlaps no label placed before it (labels taken top to bottom).

        Text keeps its size on screen, so a line is ``LINE_PX / zoom`` world units high and
        the labels are placed again when the zoom changes.
        """
        zoom = max(float(self._camera().zoom), 1e-12)
        line = LINE_PX / zoom
        entries = []
        for name in self.results:
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
                len(self.label_template(name).format(label=lab, confidence=0.0))
                for lab in pts.features["label"]
            )
            shown = image.visible and pts.visible
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

    def rows(self) -> list[tuple[str, int, str, float]]:
        return [
            (name, p.page, self.label(p), p.confidence)
            for name, preds in self.results.items()
            for p in preds
        ]

    def _fill_table(self) -> None:
        rows = self.rows()
        scores = [p.unfamiliar_score for preds in self.results.values() for p in preds]
        self.table.setRowCount(len(rows))
        for r, ((name, page, label, conf), score) in enumerate(zip(rows, scores, strict=True)):
            for c, text in enumerate(
                (name, str(page), label, f"{conf:.3f}", "" if score is None else f"{score:.2f}")
            ):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignCenter)
                self.table.setItem(r, c, item)

    def _go_to_row(self, row: int, _col: int) -> None:
        name, page = self.table.item(row, 0).text(), int(self.table.item(row, 1).text())
        self.go_to_page(name, page)

    def go_to_page(self, name: str, page: int) -> None:
        """Move the dims sliders to page ``page`` of layer ``name`` and make it active."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            _layers.show_page(self.viewer, layer, page)
            self.viewer.layers.selection.active = layer

    def in_view_text(self) -> str:
        active = self.viewer.layers.selection.active
        name = active.name if active is not None else None
        if name not in self.results:
            meta = active.metadata.get("microclf", {}) if active is not None else {}
            name = meta.get("image_layer") if isinstance(meta, dict) else None
        if name not in self.results:
            name = next(iter(self.results), None)
        if name is None or name not in self.viewer.layers:
            return ""
        layer = self.viewer.layers[name]
        page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer)) or 0
        pred = next((p for p in self.results[name] if p.page == page), None)
        if pred is None:
            return ""
        where = f", page {page}" if _layers.lead_shape(layer) else ""
        unlike = (
            f", unlike the training images: score {pred.unfamiliar_score:.2f}"
            if pred.unfamiliar
            else ""
        )
        return (
            f"In view: {name}{where}: {self.label(pred)} (confidence {pred.confidence:.2f}{unlike})"
        )

    def active_classified(self) -> str | None:
        """The classified image layer that is active (or whose label or heatmap layer is),
        if it is visible; else None."""
        active = self.viewer.layers.selection.active
        if active is None:
            return None
        name = active.name
        if name not in self.results:
            meta = active.metadata.get("microclf", {}) if isinstance(active.metadata, dict) else {}
            name = meta.get("image_layer") if isinstance(meta, dict) else None
        if name not in self.results or name not in self.viewer.layers:
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
        pred = next((p for p in self.results[name] if p.page == (page or 0)), None)
        if pred is None:
            return ""
        where = f" page {page}" if page is not None else ""
        what = (
            f"unfamiliar (score {pred.unfamiliar_score:.2f})"
            if pred.unfamiliar
            else f"{self.label(pred)} {pred.confidence:.2f}"
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

    def _update_in_view(self, *_) -> None:
        self.in_view.setText(self.in_view_text())
        text = self.overlay_text()
        overlay = self.overlay
        overlay.text = text
        overlay.visible = bool(text)

    def show_plot(self):
        """Dock the probabilities-along-stack plot under the viewer (again, if it was
        closed) and show the active classified stack; returns the plot."""
        from .stackplot import StackPlot

        if self.plot is None:
            self.plot = StackPlot(self.viewer, self)
        window = getattr(self.viewer, "window", None)
        if window is not None and not any(w is self.plot for w in window.dock_widgets.values()):
            window.add_dock_widget(self.plot, area="bottom", name=PLOT_NAME)
        self.plot.refresh()
        return self.plot

    # -- CSV -------------------------------------------------------------------------------
    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if not self.results:
            _notify("warning", "Nothing to export: run a prediction first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export predictions", "predictions.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        preds = [p for preds in self.results.values() for p in preds]
        try:
            n = write_csv(preds, path, self.class_names, self.threshold.value())
        except OSError as exc:
            _notify("error", f"Cannot write {path}: {exc}")
            return None
        self.status.setText(f"Wrote {n} rows to {path}.")
        return Path(path)

    def classify_folder(self, folder: str | Path | None = None, csv_path: str | Path | None = None):
        """Classify a folder into a CSV in a worker; returns the worker."""
        from napari.qt.threading import thread_worker

        if not self._ready():
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder of images to classify")
            if not folder:
                return None
        if csv_path is None:
            csv_path, _ = QFileDialog.getSaveFileName(
                self,
                "Write predictions to",
                str(Path(folder) / "microclf_predictions.csv"),
                "CSV (*.csv)",
            )
            if not csv_path:
                return None
        try:  # before any model is loaded
            check_csv_destination(csv_path)
        except MicroclfError as exc:
            _notify("error", f"Classify folder: {exc}")
            return None
        self._progress(0, f"Classifying {Path(folder).name}")

        def on_yield(item):
            kind, n = item
            if kind == "total":
                self.pbar.total = n
            elif n <= self.pbar.total:
                self.pbar.update(1)

        def on_return(result):
            if isinstance(result, str):
                self.status.setText(result)
                _notify("warning" if self._stop.is_set() else "error", result)
                return
            if result.stopped:
                text = (
                    f"Stopped: {len(result)} page(s) classified, their rows written to "
                    f"{result.csv_path} (the CSV of a stopped run keeps its .partial "
                    f"name; {csv_path} was not written)."
                )
                self.status.setText(text)
                _notify("warning", text)
                return
            if self.pbar.n < self.pbar.total:  # a stack cut short counted all its pages
                self.pbar.update(self.pbar.total - self.pbar.n)
            summary = result.summary()
            self.status.setText(summary)
            _notify("error" if not result.ok else "warning" if result.errors else "info", summary)

        worker = thread_worker(_predict_folder, ignore_errors=False)(
            self.bundle(),
            str(folder),
            str(csv_path),
            self.threshold.value(),
            self.tta.isChecked(),
            self._stop,
            *self.engine_choice(),
        )
        return self._start(worker, on_yield, on_return, f"Classifying {folder}...", self.folder_btn)
