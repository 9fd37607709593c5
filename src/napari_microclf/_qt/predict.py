"""Predict: classify image layers (every page of a stack) and folders with a trained model.

The widget owns the model row, the choice of layers, the Run / Classify folder / Explain
buttons (each turns into Stop while its run goes on), the results table and its CSV. Per
image layer the results are

- stored on the image layer in ``metadata["microclf"]["predictions"]`` (model, class names,
  per page class, confidence and probabilities), in ``self.results`` and in the results
  table, which exports to CSV in the ``microclf predict`` format (its ``file`` column holds
  the layer name);
- drawn on the canvas by a label layer ``"<layer> classes"`` that follows its image, and
  written in a canvas overlay for the active layer (``overlays.PageLabels``);
- plotted along a stack (probabilities per page, linked with the slider) in a dock under the
  viewer (``stackplot.StackPlot``), opened when a stack is classified or by "Plot along
  stack".

**Explain** adds, per chosen layer, an image layer ``"<layer> Grad-CAM"``: where the model
looks, page by page, on the source's pixels (``heatmaps``).

The model is loaded once per bundle, engine and precision, and reloaded only when the bundle
is rewritten (``predictor_cache``).
"""

from __future__ import annotations

import threading
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

from ..core.bundle import read_meta
from ..core.csv_format import check_csv_destination, write_csv
from ..core.errors import BundleError, MicroclfError, one_line
from ..core.files import refuse_destroying
from ..core.folder_runs import iter_folder
from ..core.images import ImageReadError, count_pages, find_images
from ..core.objects import model_crop_spec
from ..core.predict_options import DEFAULTS
from ..core.report import describe_model
from ..core.results import PagePrediction
from . import _layers, _settings
from ._notify import notify as _notify
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._tf import ensure_tensorflow
from ._worker import stoppable_progress, surfaced
from .export import ExportRow
from .heatmaps import PREDICTED, explain_layers, rename_heatmap, show_heatmap
from .overlays import PageLabels
from .predict_objects import ObjectJob, ObjectResults, predict_object_layers
from .predictor_cache import cache_info, forget_model, get_predictor

ERRORS = (BundleError, ImageReadError, ValueError, OSError)
PLOT_NAME = "Probabilities along stack"
LABELS_AUTO = "auto: the Labels layer of the image's shape"
LABELS_NONE = "none: classify whole pages"
PAGE_HEADER = ["layer", "page", "class", "confidence"]
UNFAMILIAR_HEADER = "unfamiliar (>1: unlike training)"  # the score column of the table


# The Predict widget's engine choices (see core/engine.py): label -> (engine, precision)
ENGINE_CHOICES = (
    ("auto: OpenVINO if installed, else TensorFlow", ("auto", "f32")),
    ("OpenVINO (fp32)", ("openvino", "f32")),
    ("OpenVINO bf16: faster, approximate", ("openvino", "bf16")),
    ("OpenVINO int8: fastest, approximate", ("openvino", "int8")),
    ("TensorFlow", ("tensorflow", "f32")),
)


@surfaced
def _predict_layers(
    bundle: str,
    sources: list,
    tta: bool = DEFAULTS.tta,
    stop: threading.Event | None = None,
    engine: str = DEFAULTS.engine,
    precision: str = DEFAULTS.precision,
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
    tta: bool = DEFAULTS.tta,
    stop: threading.Event | None = None,
    engine: str = DEFAULTS.engine,
    precision: str = DEFAULTS.precision,
):
    """Worker: classifies every image under ``folder`` past bad files, the rows streamed to
    the CSV (see ``core.folder_runs.predict_folder``). Yields ``("total", pages)``, then
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
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip(
            "The segmentation to classify object by object with a model of objects (trained "
            "on cells of a Labels layer): auto pairs each image with the Labels layer of its "
            "shape. A model of whole images classifies pages and takes no labels."
        )

        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(DEFAULTS.threshold)
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

        self.table = QTableWidget(0, 5)
        self._page_header()
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setMinimumHeight(180)
        self.table.cellDoubleClicked.connect(self._go_to_row)
        self.table.cellClicked.connect(self._row_clicked)
        self.objects = ObjectResults(self)  # a model of objects: its layers, legend, rows
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

        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_layers)
        # the label layers, the canvas overlay and the in-view line
        self.labels = PageLabels(self.viewer, self)
        self.in_view = self.labels.in_view

        form = QFormLayout()
        form.addRow("Model", bundle_row)
        form.addRow(self.model_info)
        # share the model: bioimage.io package, SavedModel, ONNX or one zip (docs/export.md)
        self.export_row = ExportRow(self)
        form.addRow(self.export_row)
        form.addRow("Image layers", layer_row)
        form.addRow("Labels layer", self.labels_combo)
        form.addRow("Confidence threshold", self.threshold)
        form.addRow(self.tta)
        form.addRow("Engine", self.engine)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addLayout(explain_row)
        layout.addWidget(self.status)
        layout.addWidget(self.in_view)
        layout.addWidget(self.objects.legend)
        layout.addWidget(self.table, 1)
        layout.addLayout(result_row)

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
        self.tta.setChecked(bool(saved.get("tta", DEFAULTS.tta)))
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
        from ..core.bundle import describe_bundle, restore_previous
        from ..core.errors import MicroclfError

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
        from ..core.bundle import has_previous

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
        current = self.labels_combo.currentText()
        items = [LABELS_AUTO, LABELS_NONE, *(lyr.name for lyr in _layers.user_labels(self.viewer))]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(items)
        if current in items:
            self.labels_combo.setCurrentText(current)
        self.labels_combo.blockSignals(False)

    def choose_labels(self, name: str) -> None:
        """The Labels layer row: a layer's name, ``LABELS_AUTO`` or ``LABELS_NONE``."""
        self.labels_combo.setCurrentText(name)

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
        meta = read_meta(self.bundle())
        chosen = self.labels_combo.currentText()
        if model_crop_spec(meta) is not None:
            jobs = self._object_jobs(sources, chosen)
            return None if jobs is None else self._run_objects(jobs)
        if chosen not in (LABELS_AUTO, LABELS_NONE):
            _notify(
                "error",
                f"Cannot predict: {Path(self.bundle()).name} was trained on whole images, not "
                f"on objects: it cannot classify the cells of '{chosen}'. Set Labels layer to "
                "none, or choose a model trained on objects (Annotate's Objects group).",
            )
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
            self.objects.showing = False
            for name, preds in new.items():
                if preds:
                    self.objects.drop(name)
                    self.results[name] = preds
                    self._store(name, bundle)
            self._fill_table()
            self.labels.place()
            self.labels.update_in_view()
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
            "Loading the model..." if not cache_info().currsize else "Classifying...",
            self.run_btn,
        )

    # -- objects (a model trained on the cells of Labels layers) ------------------------------
    def _object_jobs(self, sources, chosen: str) -> list[ObjectJob] | None:
        """Each chosen image with its Labels layer (the one chosen, or the one of its shape),
        said in the status line; None, said in a notification, when one has none."""
        model = Path(self.bundle()).name
        if chosen == LABELS_NONE:
            _notify(
                "error",
                f"Cannot predict: {model} classifies objects, not whole pages: choose the "
                "images' Labels layer (or auto), or a model trained on whole images.",
            )
            return None
        jobs, said = [], []
        for src in sources:
            image = self.viewer.layers[src.name]
            fits = _layers.labels_for(self.viewer, image)
            if chosen != LABELS_AUTO:
                fits = [lyr for lyr in fits if lyr.name == chosen]
            if not fits:
                what = (
                    f"'{chosen}' does not have" if chosen != LABELS_AUTO else "no Labels layer has"
                )
                _notify(
                    "error",
                    f"Cannot predict: {model} classifies objects and {what} the shape of "
                    f"'{src.name}' {tuple(_layers._data(image).shape)}: open or paint its "
                    "segmentation (a Labels layer) first.",
                )
                return None
            labels = fits[0]
            jobs.append(ObjectJob(src.name, src, labels.data, labels.name))
            more = f" (of {len(fits)} that fit)" if len(fits) > 1 else ""
            said.append(f"'{src.name}' with '{labels.name}'{more}")
        self._pairs = "Objects of " + ", ".join(said)
        return jobs

    def _run_objects(self, jobs: list[ObjectJob]):
        """Classify every object of each job in a worker; returns the worker."""
        from napari.qt.threading import thread_worker

        total = sum(j.source.n_pages for j in jobs)
        self._progress(total, "Classifying objects")
        new: dict[str, list] = {j.name: [] for j in jobs}

        def on_yield(item):
            if item[0] == "__model__":
                self.class_names = list(item[1])
                return
            name, _page, preds = item
            new[name].extend(preds)
            self.pbar.update(1)

        def on_return(error):
            if error:
                _notify("error", f"Cannot predict: {error}")
            done = [j for j in jobs if new[j.name]]
            for job in done:
                self.objects.show(job.name, job, new[job.name])
            if done:
                self.objects.showing = True
            self._fill_table()
            stacks = [j for j in done if _layers.n_pages(self.viewer.layers[j.name]) > 1]
            if stacks:  # the objects of each class, page by page
                self.show_plot()
            elif self.plot is not None:
                self.plot.refresh()
            n = sum(len(p) for p in new.values())
            text = f"{self._pairs}: {n} object(s) classified."
            if self._stop.is_set():
                text = f"Stopped: {text}"
            self.status.setText(text)

        worker = thread_worker(predict_object_layers, ignore_errors=False)(
            self.bundle(), jobs, self.tta.isChecked(), self._stop, *self.engine_choice()
        )
        return self._start(worker, on_yield, on_return, f"{self._pairs}...", self.run_btn)

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
                show_heatmap(
                    self.viewer,
                    name,
                    np.stack(maps[name]).reshape(*leads[name], *maps[name][0].shape),
                )
            which = class_name or "the predicted class"
            text = f"Grad-CAM for {which}: {len(done)} layer(s)."
            if self._stop.is_set() and len(done) < len(maps):
                text = (
                    f"Stopped: Grad-CAM for {which} of {len(done)} of {len(maps)} "
                    "layer(s) (a layer gets its heatmap when all its pages are done)."
                )
            self.status.setText(text)

        worker = thread_worker(explain_layers, ignore_errors=False)(
            self.bundle(), sources, class_name, self._stop
        )
        return self._start(worker, on_yield, on_return, "Computing Grad-CAM...", self.explain_btn)

    # -- results on layers ---------------------------------------------------------------
    def label(self, pred: PagePrediction) -> str:
        return pred.label(self.threshold.value())

    def _store(self, name: str, bundle: str) -> None:
        """The predictions in the image layer's metadata, and its label layer."""
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
        self.labels.show(name, preds)

    def _relabel(self, *_) -> None:
        """The threshold changed: the labels, the table and the plot say it."""
        self.labels.relabel()
        self.objects.relabel()
        self._fill_table()
        if self.plot is not None:
            self.plot.refresh()

    def image_renamed(self, old: str, new: str) -> None:
        """A classified image was renamed (``PageLabels`` renamed its label layer): its
        results and heatmap layer take the new name."""
        self.results = {new if k == old else k: v for k, v in self.results.items()}
        rename_heatmap(self.viewer, old, new)
        self._fill_table()
        if self.plot is not None:
            if self.plot.layer == old:
                self.plot.layer = new
            self.plot.refresh()

    def image_removed(self, name: str) -> None:
        """A classified image was removed (with its label layer): its results go too."""
        self.results.pop(name, None)
        self._fill_table()
        if self.plot is not None:
            self.plot.refresh()

    def rows(self) -> list[tuple[str, int, str, float]]:
        return [
            (name, p.page, self.label(p), p.confidence)
            for name, preds in self.results.items()
            for p in preds
        ]

    def _page_header(self) -> None:
        self.table.setColumnCount(5)
        self.table.setHorizontalHeaderLabels([*PAGE_HEADER, UNFAMILIAR_HEADER])
        self.table.horizontalHeaderItem(4).setToolTip(
            "Unfamiliar score: the distance from the training images over the model's "
            "threshold. Up to 1 the page is like them; above 1 it is unlike them and reads "
            "'unfamiliar' (blank: a model trained before this score existed)."
        )
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)

    def _fill_table(self) -> None:
        """The results table: the objects of the last run of a model of objects, else the
        pages."""
        if self.objects.showing:
            self.objects.fill_table()
            return
        self.objects.update_legend()
        if self.table.columnCount() != 5:
            self._page_header()
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

    def _row_clicked(self, row: int, _col: int) -> None:
        if self.objects.showing:
            self.objects.go_to_row(row)

    def _go_to_row(self, row: int, _col: int) -> None:
        if self.objects.showing:
            self.objects.go_to_row(row)
            return
        name, page = self.table.item(row, 0).text(), int(self.table.item(row, 1).text())
        self.go_to_page(name, page)

    def go_to_page(self, name: str, page: int) -> None:
        """Move the dims sliders to page ``page`` of layer ``name`` and make it active."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            _layers.show_page(self.viewer, layer, page)
            self.viewer.layers.selection.active = layer

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
        """The table as CSV: one row per page, or per object after a model of objects."""
        results = self.objects.results if self.objects.showing else self.results
        if not results:
            _notify("warning", "Nothing to export: run a prediction first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export predictions", "predictions.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        preds = [p for preds in results.values() for p in preds]
        sources = [
            _layers.source_of(self.viewer.layers[name])
            for name in results
            if name in self.viewer.layers
        ]
        try:  # never over an image of the classified layers, nor into the model folder
            refuse_destroying(
                path,
                inputs=[s for s in sources if Path(s).is_file()],
                protected=[self.bundle()] if self.bundle() else [],
                what="CSV destination",
            )
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
        try:  # before any model is loaded: never over an image, nor into the model folder
            check_csv_destination(csv_path)
            refuse_destroying(
                csv_path,
                inputs=find_images([folder]),
                protected=[self.bundle()],
                what="CSV destination",
            )
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
