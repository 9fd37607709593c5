"""Training: ``train(config, on_update=None, should_stop=None) -> TrainResult``.

Plain and callable from a notebook; the napari widget and the CLI consume the same typed
updates. ``on_update`` is called from the training thread with :class:`Message`,
:class:`Progress`, :class:`EpochStart`, :class:`BatchEnd` and :class:`EpochEnd` objects.
``should_stop()`` is polled after every batch (and every image while loading); a stopped or
failed training writes nothing, so an earlier model bundle stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

import numpy as np

from .bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    META_FILE,
    repair_model_folder,
    versions,
    write_bundle,
)

# a bundle keeps its own train/val/test files and hashes under the dataset's file name
from .dataset import SPLIT_FILE, class_files, list_classes, load_samples, split_manifest
from .device import configure_gpus, distribution, even_count, predict_padded, replicas
from .engine import IR_BIN, IR_XML, classifier_forward, engine_label, ir_bytes, resolve_engine
from .errors import DeviceError, OutputError
from .familiar import FAMILIARITY_FILE, base_features, fit_for_training, pooled_features
from .features import (
    FeatureCache,
    FeatureExtractor,
    cache_key,
    extract_features,
    key_fields,
    prune_cache,
    remove_stale_temporaries,
)
from .finetune import (
    boundary_activations,
    make_schedule,
    parse_duration,
    smoothed_loss,
    split_classifier,
)
from .images import ImageReadError, count_pages
from .lock import model_lock
from .metrics import epoch_metrics
from .model import (
    FEATURE_LAYER,
    FROZEN_RANDOM_WARNING,
    N_STAGES,
    base_layer,
    build_classifier,
    build_head,
    parse_fine_tune,
    resolve_weights,
    set_fine_tune,
    weights_identity,
)
from .objects import dataset_crop_spec
from .pipeline import EpochOrder, PageMemo, PageSource, gather_dataset, page_memory_budget
from .preflight import preflight
from .report import classification_report, describe_model, diagnose, report_files, tta_summary
from .report_html import REPORT_HTML, render_report_html
from .train_config import GUIDE, TrainConfig, guide_departures
from .tta import model_probabilities

# Without pretrained weights a frozen base learns nothing; this is the recipe that trains the
# whole network from scratch reliably on the sample data (150 images per class: test accuracy
# 0.87-0.91 over two seeds, about a minute on 2 cores). weights="auto" falls back to it when
# no pretrained weights can be had at all.
FROM_SCRATCH = {
    "weights": "none",
    "fine_tune": "all",
    "image_size": 48,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "epochs": 20,
    "augment": False,
    "early_stopping": False,
    "reduce_lr_patience": 20,
}


WARMUP_EPOCHS = 2  # fine-tuning's 'cosine' schedule warms the learning rate up this long
EARLY_STOPPING_MIN_DELTA = 1e-4  # the smallest fall of the validation loss that counts

# -- the training guide's dataset-size table -------------------------------------------------


@dataclass(frozen=True)
class Preset:
    row: str  # the guide's row
    n_images: int
    reason: str
    settings: dict

    @property
    def text(self) -> str:
        values = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.settings.items())
        return f"Preset '{self.row}' ({self.reason}): {values}."


def suggest_settings(n_images: int) -> Preset:
    """Settings for very small (< 100), medium (100-1000) and large (> 1000) datasets: the
    training guide's rows, with the head's measured learning rate (docs/validity.md). Every
    value stays editable."""
    if n_images < 100:
        return Preset(
            "very small dataset",
            n_images,
            f"{n_images} images, under 100",
            {
                "augment": True,
                "augment_strength": 0.1,
                "learning_rate": 1e-3,
                "batch_size": 8,
                "dropout": 0.35,
                "fine_tune": 0,
            },
        )
    if n_images <= 1000:
        return Preset(
            "medium dataset",
            n_images,
            f"{n_images} images, 100 to 1000",
            {
                "augment": True,
                "augment_strength": 0.05,
                "learning_rate": 1e-3,
                "batch_size": 32,
                "dropout": 0.2,
                "fine_tune": 0,
            },
        )
    return Preset(
        "large dataset",
        n_images,
        f"{n_images} images, over 1000",
        {
            "augment": True,
            "augment_strength": 0.1,
            "learning_rate": 1e-3,
            "batch_size": 64,
            "dropout": 0.2,
            "fine_tune": 2,
            "fine_tune_epochs": 30,
            "time_budget": "30m",
        },
    )


def guide_preset() -> Preset:
    """The training guide's exact recipe (``--preset guide``): learning rate 1e-4, 15
    epochs, balanced class weights, percentile intensity (see ``train_config.GUIDE``)."""
    return Preset("training guide", 0, "the guide's recipe as written", dict(GUIDE))


def preset_for(name: str, data_dir) -> Preset | None:
    """``--preset``'s settings: ``"auto"`` (by the dataset's size), ``"guide"`` or
    ``"none"`` (None)."""
    if name == "auto":
        return suggest_settings(count_images(data_dir))
    if name == "guide":
        return guide_preset()
    return None


def count_images(data_dir: str | Path) -> int:
    """Pages in the dataset's class folders (a multi-page file counts each page)."""
    n = 0
    for c in list_classes(data_dir):
        for p in class_files(data_dir, c):
            try:
                n += count_pages(p)
            except ImageReadError:
                n += 1  # said by the training's own checks
    return n


# -- typed updates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    text: str
    level: str = "info"  # "info" or "warning"


@dataclass(frozen=True)
class Progress:
    phase: str  # "loading", "features", "evaluating"
    done: int
    total: int
    rate: float | None = None  # items per second
    eta: float | None = None  # seconds left

    @property
    def text(self) -> str:
        s = f"{self.phase}: {self.done}/{self.total}"
        if self.rate:
            s += f" - {self.rate:.1f} images/s"
        if self.eta is not None:
            s += f" - ETA {self.eta:.0f}s"
        return s


@dataclass(frozen=True)
class EpochStart:
    epoch: int  # 1-based
    epochs: int

    @property
    def text(self) -> str:
        return f"Epoch {self.epoch}/{self.epochs}"


@dataclass(frozen=True)
class PhaseStart:
    """Fine-tuning's phase 2 begins (the curves mark this epoch)."""

    phase: int
    epoch: int  # the first epoch of the phase, 1-based
    text: str


@dataclass(frozen=True)
class BatchEnd:
    epoch: int
    epochs: int
    batch: int  # 1-based
    steps: int
    logs: dict


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    epochs: int
    steps: int
    seconds: float
    logs: dict
    line: str
    history: dict

    @property
    def text(self) -> str:
        return self.line


@dataclass
class TrainResult:
    bundle: Path | None
    class_names: list[str]
    history: dict
    report: dict | None
    stopped: bool = False
    epochs_run: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


# -- formatting ---------------------------------------------------------------------------


def format_epoch_line(steps: int, seconds: float, logs: dict, lr: float | None) -> str:
    """The Keras-style line of the training guide."""
    parts = [f"{steps}/{steps}", f"{seconds:.0f}s"]
    for key in EPOCH_LINE_KEYS:
        if key in logs:
            parts.append(f"{key}: {logs[key]:.4f}")
    if lr is not None:
        parts.append(f"lr: {lr:.4e}")
    ms = 1000 * seconds / max(steps, 1)
    parts += [f"{seconds:.0f}s/epoch", f"{ms:.0f}ms/step"]
    return " - ".join(parts)


# The guide's four values, then the two that imbalance does not fool (core/metrics.py)
EPOCH_LINE_KEYS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
)
HISTORY_KEYS = (*EPOCH_LINE_KEYS, "balanced_accuracy", "macro_f1")


def balanced_class_weights(distribution: dict[int, int]) -> dict[int, float]:
    """n_samples / (n_classes * n_class): rarer classes weigh more."""
    total, k = sum(distribution.values()), len(distribution)
    return {c: (total / (k * n) if n else 0.0) for c, n in distribution.items()}


def class_weights_for(distribution: dict[int, int], kind: str) -> dict[int, float] | None:
    """The class weights of ``kind``: ``"balanced"`` (:func:`balanced_class_weights`, the
    guide's), ``"sqrt"`` (their square roots, scaled so that an image weighs 1 on average:
    rare classes count more without outvoting the rest) or ``"none"`` (None)."""
    if kind == "none":
        return None
    weights = balanced_class_weights(distribution)
    if kind == "balanced":
        return weights
    root = {c: float(np.sqrt(w)) for c, w in weights.items()}
    total = sum(distribution.values())
    mean = sum(root[c] * n for c, n in distribution.items()) / total if total else 1.0
    return {c: w / mean for c, w in root.items()}


# -- the Keras callback -------------------------------------------------------------------


def _make_callback(epochs: int, steps: int, emit, should_stop, history: dict):
    import keras

    class _Reporter(keras.callbacks.Callback):
        """Turns Keras events into typed updates and honours the stop request."""

        def __init__(self):
            super().__init__()
            self.stopped = False
            self.epochs_run = 0
            self.history, self.emit = history, emit
            self.phase = 1  # fine-tuning's phase of the epochs now running
            self.epochs = epochs  # the most epochs; known for sure once phase 1 has ended
            self.steps = steps  # of an epoch; each phase sets its own

        def _check_stop(self):
            if should_stop is not None and should_stop():
                self.stopped = True
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            emit(EpochStart(epoch + 1, self.epochs))
            self._check_stop()

        def on_train_batch_end(self, batch, logs=None):
            emit(BatchEnd(self._epoch_now(), self.epochs, batch + 1, self.steps, _floats(logs)))
            self._check_stop()

        def _epoch_now(self):
            return self.epochs_run + 1

        def on_epoch_end(self, epoch, logs=None):
            if self.stopped:  # a stopped epoch is not a finished one
                return
            seconds = time.perf_counter() - self._t0
            logs = _floats(logs)
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            for key in HISTORY_KEYS:
                if key in logs:
                    history.setdefault(key, []).append(logs[key])
            history.setdefault("lr", []).append(lr)
            history.setdefault("phase", []).append(self.phase)
            self.epochs_run = epoch + 1
            emit(
                EpochEnd(
                    epoch + 1,
                    self.epochs,
                    self.steps,
                    seconds,
                    logs,
                    format_epoch_line(self.steps, seconds, logs, lr),
                    {k: list(v) for k, v in history.items()},
                )
            )

    return _Reporter()


def _floats(logs) -> dict:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


# -- train ------------------------------------------------------------------------------


def _holding_model_lock(fn):
    """``train`` holds its model folder's lock (``OUT/.microclf.lock``) for its whole run,
    so a second training into the same folder is refused at once, naming this one; an
    interrupted swap left there by a killed run is completed first."""

    @wraps(fn)
    def locked(config, on_update=None, should_stop=None):
        with model_lock(config.out_dir, "microclf train") as lock:
            notes = ([lock.note] if lock.note else []) + repair_model_folder(config.out_dir)
            for note in notes if on_update is not None else ():
                on_update(Message(note, "warning"))
            return fn(config, on_update, should_stop)

    return locked


def _keeping_global_random_state(fn):
    """Keras makes a training reproducible with ``keras.utils.set_random_seed``, which seeds
    Python's and NumPy's global generators too; napari and the user's own code draw from
    those, so their states are put back when the training ends (TensorFlow's global seed
    stays: nothing else in napari uses it)."""

    @wraps(fn)
    def kept(*args, **kwargs):
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            return fn(*args, **kwargs)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    return kept


@_holding_model_lock
@_keeping_global_random_state
def train(
    config: TrainConfig,
    on_update: Callable[[object], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a classifier on ``config.data_dir`` and write the bundle to ``config.out_dir``.

    Parameters
    ----------
    config : TrainConfig
        The settings (the training guide's defaults).
    on_update : callable, optional
        Called from the training thread with :class:`Message`, :class:`Progress`,
        :class:`PhaseStart`, :class:`EpochStart`, :class:`BatchEnd` and :class:`EpochEnd`.
    should_stop : callable, optional
        Polled after every batch and image; when it returns True the training stops and
        writes nothing.

    Returns
    -------
    TrainResult
        The bundle path (None when stopped), history, test report and the bundle's metadata.

    A frozen pretrained base trains its head on cached backbone features. With ``fine_tune``
    and pretrained weights the training has two phases: the head on the frozen base
    (``head_epochs``, from cached features), then the top stages unfrozen at the learning
    rate times ``fine_tune_lr_factor`` for the remaining epochs, starting from that head.
    """
    t_start = time.perf_counter()

    def emit(update):
        if on_update is not None:
            on_update(update)

    def stopped_result(names, history, epochs_run=0):
        had_model = (Path(config.out_dir) / META_FILE).exists()
        emit(
            Message(
                "Training stopped: no model was written"
                + (f" (the model in {config.out_dir} is unchanged)." if had_model else "."),
                "warning",
            )
        )
        return TrainResult(
            None, names, history, None, True, epochs_run, time.perf_counter() - t_start
        )

    # Every problem a user can fix, said before any TensorFlow work (all bad images at once).
    checked = preflight(config)
    for note in checked.notes:
        emit(Message(note))
    for warning in checked.warnings:
        emit(Message(warning, "warning"))
    configure_gpus()  # memory growth on: TensorFlow takes what it uses, not the whole card
    with _on_devices(config, emit):
        return _train(config, emit, should_stop, stopped_result, t_start)


def samples_of(config: TrainConfig):
    """The dataset's train/val/test pages under ``config``'s split settings (the split file
    read, or written when new); a dataset that cannot hold its split file is an OutputError."""
    try:
        return load_samples(
            config.data_dir,
            config.val_split,
            config.test_split,
            config.seed,
            config.resplit,
            group_by=config.group_by,
        )
    except PermissionError as exc:
        if SPLIT_FILE not in Path(str(exc.filename)).name:
            raise
        # the preflight found the split current, or the dataset turned read-only since
        raise OutputError(
            f"cannot write {Path(config.data_dir) / SPLIT_FILE} (permission "
            "denied): make the dataset writable, or copy it to a writable "
            "folder and train on the copy"
        ) from exc


def has_head_phase(config: TrainConfig, fine_tune: int, weights) -> bool:
    """Whether fine-tuning (``fine_tune`` parsed) first trains the head on the frozen base."""
    return fine_tune != 0 and weights is not None and config.head_epochs > 0


def most_epochs(config: TrainConfig) -> int:
    """:func:`planned_epochs` before the weights are resolved (a progress bar's total)."""
    weights = None if str(config.weights).lower() == "none" else config.weights
    return planned_epochs(
        config, has_head_phase(config, parse_fine_tune(config.fine_tune), weights)
    )


def planned_epochs(config: TrainConfig, two_phase: bool) -> int:
    """The most epochs the training runs: ``epochs``, or with fine-tuning's two phases the
    head's most epochs and the fine-tuning epochs (early stopping may end either sooner)."""
    return config.head_epochs + config.fine_tune_epochs if two_phase else config.epochs


def reads_cached_features(config: TrainConfig, fine_tune: int, weights) -> bool:
    """Whether the training (or its first phase) trains the head on cached features."""
    return config.cache and (fine_tune == 0 or has_head_phase(config, fine_tune, weights))


# Keras traces the whole network's training step before its first batch. Measured on this
# project's 2-core CPU (EfficientNet-B0, every layer trained): the trace costs about 26 s; an
# eager step costs about 0.9 s more than a traced one, plus 3e-6 s per pixel of its batch
# (32 px, batch 8: 0.9 s more; 224 px, batch 16: 3.4 s more). A training of a few steps (a
# handful of images, an epoch or two) whose eager extra stays under the trace runs eagerly:
# the same steps and numbers, sooner. The head on cached features is a small graph, traced
# in a fraction of a second, and a MirroredStrategy wants its graph.
TRACE_SECONDS = 25.0
EAGER_STEP_SECONDS = 0.9
EAGER_PIXEL_SECONDS = 3e-6


def runs_eagerly(cached: bool, n_train: int, batch_size: int, epochs: int, size: int) -> bool:
    """Whether a phase of ``epochs`` over ``n_train`` images of ``size`` px runs Keras
    eagerly: the whole network trains (not the cached-features head), on one device, and
    its steps' eager extra (see :data:`TRACE_SECONDS`) is less than the trace would cost."""
    batch = max(int(batch_size), 1)
    steps = -(-int(n_train) // batch) * max(int(epochs), 0)
    extra = steps * (EAGER_STEP_SECONDS + EAGER_PIXEL_SECONDS * batch * size * size)
    return not cached and replicas() == 1 and extra < TRACE_SECONDS


@contextlib.contextmanager
def _on_devices(config: TrainConfig, emit):
    """Run the training inside a MirroredStrategy's scope when ``config.devices`` names two or
    more devices (:func:`~.device.distribution`), saying so; else on TensorFlow's default."""
    try:
        strategy = distribution(config.devices)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    if strategy is None:
        yield
        return
    n = strategy.num_replicas_in_sync
    names = ", ".join(d.rsplit("/", 1)[-1] for d in strategy.extended.worker_devices)
    share, extra = divmod(config.batch_size, n)
    per_device = f"{share}" if not extra else f"{share}-{share + 1}"
    emit(
        Message(
            f"Training on {n} devices ({names}), MirroredStrategy: each batch of "
            f"{config.batch_size} is split {per_device} per device and the "
            f"learning rate stays {config.learning_rate:.1e}."
        )
    )
    with strategy.scope():
        yield


def _train(config: TrainConfig, emit, should_stop, stopped_result, t_start: float) -> TrainResult:
    """:func:`train` after its checks, inside the devices' scope (see :func:`_on_devices`)."""
    if n_stale := remove_stale_temporaries(config.data_dir):
        emit(Message(f"Removed {n_stale} half-written cache file(s) left by an interrupted run."))
    resolved = resolve_weights(config.backbone, config.weights)
    if resolved.note:
        emit(Message(resolved.note, resolved.level))
    if resolved.weights is None and str(config.weights).lower() == "auto":
        # the recipe's own epochs unless the user chose theirs
        chosen = config.epochs != TrainConfig.__dataclass_fields__["epochs"].default
        epochs = config.epochs if chosen else FROM_SCRATCH["epochs"]
        config = dataclasses.replace(config, **{**FROM_SCRATCH, "epochs": epochs})
    backbone, weights = resolved.backbone, resolved.weights
    fine_tune = parse_fine_tune(config.fine_tune)
    samples = samples_of(config)
    names = samples.class_names
    if config.resplit:
        emit(
            Message(
                f"New split: {Path(config.data_dir) / SPLIT_FILE} was drawn again (seed "
                f"{config.seed}, validation {config.val_split:.0%}, test "
                f"{config.test_split:.0%}); the test set changed, so earlier models' "
                "test accuracies do not compare with this one's."
            )
        )
    for note in samples.notes:
        emit(Message(note))
    if weights is None and fine_tune == 0:
        emit(Message(FROZEN_RANDOM_WARNING, "warning"))
    spec = config.preprocessing
    emit(Message(f"Backbone: {backbone}, weights: {weights or 'none (random start)'}"))
    engine = resolve_engine(config.engine)
    emit(
        Message(
            f"Inference engine: {engine_label(engine)} for the backbone features and the "
            "test set; the training runs on TensorFlow"
        )
    )
    emit(Message(f"Classes: {dict(enumerate(names))}"))
    for line in samples.split_lines():
        is_warning = line.startswith("Warning: ")
        emit(Message(line.removeprefix("Warning: "), "warning" if is_warning else "info"))

    distribution = samples.distribution("train")
    emit(Message(f"Class distribution: {distribution}"))
    class_weight = class_weights_for(distribution, config.class_weights)
    if class_weight:
        emit(
            Message(
                f"Class weights: { {k: round(v, 2) for k, v in class_weight.items()} } "
                f"({config.class_weights})"
            )
        )
    if departures := guide_departures(config):
        emit(
            Message(
                "Defaults that depart from the training guide, measured on real data "
                f"(docs/validity.md): {'; '.join(departures)}. The guide's recipe: "
                "--preset guide."
            )
        )

    # Fine-tuning a pretrained base starts from a head trained on the frozen base.
    two_phase = has_head_phase(config, fine_tune, weights)
    head_epochs = config.head_epochs if two_phase else config.epochs
    model = build_classifier(
        len(names),
        config.image_size,
        weights,
        config.dropout,
        config.augment,
        config.augment_strength,
        0 if two_phase else fine_tune,
        config.seed,
        backbone,
        warn=False,
    )  # said above as a Message
    y = {
        s: np.asarray([r.label for r in getattr(samples, s)], dtype=np.int32)
        for s in ("train", "val", "test")
    }
    cached = reads_cached_features(config, fine_tune, weights)
    weights_id = weights_identity(backbone, weights, config.seed)
    converted: dict = {}  # _features' OpenVINO backbone, reused for the bundle's model
    if cached:
        inputs = _features(
            config,
            samples,
            model,
            weights_id,
            emit,
            should_stop,
            subsets=("train", "val") if two_phase else ("train", "val", "test"),
            engine=engine,
            converted=converted,
        )
    else:
        inputs = _images(config, samples)
    if inputs is None:
        return stopped_result(names, {})

    history: dict = {}
    steps = int(np.ceil(len(y["train"]) / config.batch_size))
    reporter = _make_callback(planned_epochs(config, two_phase), steps, emit, should_stop, history)
    fit = _Fitter(config, y, class_weight, reporter)
    # Phase 1 (or the only phase). With cached features only the head is trained; it shares
    # the classifier's layers.
    trained = fit.run(model, inputs, cached, config.learning_rate, 0, head_epochs, phase=1)
    if reporter.stopped:
        return stopped_result(names, history, reporter.epochs_run)
    if two_phase:
        lr2 = config.learning_rate * config.fine_tune_lr_factor
        stages = "all stages" if fine_tune == -1 else f"the top {fine_tune} of 7 stages"
        first, last = reporter.epochs_run, reporter.epochs_run + config.fine_tune_epochs
        reporter.epochs = last  # phase 1 ended early: the total is now known
        emit(
            PhaseStart(
                2,
                first + 1,
                f"Phase 2: fine-tuning {stages} from the trained head, learning rate "
                f"{lr2:.1e}, epochs {first + 1}-{last}",
            )
        )
        set_fine_tune(model, fine_tune)
        net = None
        if config.cache and 1 <= fine_tune < N_STAGES:
            # the frozen stages run once per image and view; the open stages train alone
            acts = _activations(config, samples, model, fine_tune, emit, should_stop)
            if acts is None:
                return stopped_result(names, history, reporter.epochs_run)
            inputs, net, fit.reserve_s = acts
        elif cached:  # phase 2 needs the images themselves
            inputs = _images(config, samples)
        fit.run(model, inputs, False, lr2, first, last, phase=2, net=net, t_start=t_start)
        trained, cached = model, False
        if reporter.stopped:
            return stopped_result(names, history, reporter.epochs_run)
        if net is not None:  # the test set and familiarity read the images
            inputs = _images(config, samples)

    report = None
    # the trained classifier as the engine runs it: the test set, the familiarity fit and
    # (converted once here) the bundle's own OpenVINO model
    t_convert = time.perf_counter()
    frozen_base = None
    if engine == "openvino" and cached:  # the base the features came from: add the head
        frozen_base = converted["backbone"]
    forward, ov_model = (
        classifier_forward(model, engine, frozen_base=frozen_base)
        if engine == "openvino"
        else (None, None)
    )
    if ov_model is not None:
        how = "Added the trained head to the converted backbone" if frozen_base else "Converted"
        emit(
            Message(
                f"{how} for OpenVINO in {time.perf_counter() - t_convert:.1f}s (kept in "
                "the model folder)"
            )
        )
    if len(y["test"]):
        emit(Progress("evaluating", 0, len(y["test"])))
        if cached:
            probs = predict_padded(trained, inputs["test"], config.batch_size)
        else:  # read from the files in chunks
            probs = model_probabilities(
                trained, spec, samples.test, config.batch_size, forward=forward
            )[0]
        emit(Progress("evaluating", len(y["test"]), len(y["test"])))
        report = classification_report(y["test"], probs, names, samples.test)
        # test-time augmentation: the full model on each test image and its three flips
        # (cached features are of unflipped images, so the images are read again for it)
        t_tta = time.perf_counter()
        tta_probs = model_probabilities(
            model, spec, samples.test, config.batch_size, tta=True, forward=forward
        )[0]
        tta_acc = classification_report(y["test"], tta_probs, names)["accuracy"]
        report["tta"] = tta_summary(
            tta_acc, y["test"], probs, in_metrics=False, seconds=time.perf_counter() - t_tta
        )
    else:
        report = classification_report([], np.zeros((0, len(names))), names)
        emit(
            Message(
                "No test images in the split: the test report is empty. Add images or "
                "raise the test fraction.",
                "warning",
            )
        )
    report["subset"] = "test"
    report["groups"] = samples.subset_groups.get("test")
    report["title"] = f"Test report: {Path(config.out_dir).name} on its own test set"
    report["diagnosis"] = diagnose(history, report, kept=fit.phases[-1].get("kept_epoch"))
    # where the training data lie in feature space, to flag unfamiliar images (familiar.py)
    extract = None if cached else base_features(model, config.batch_size, forward)
    familiarity, fit_seconds = fit_for_training(
        model, inputs, y, len(names), cached, config.batch_size, config.seed, forward, extract
    )
    cal = familiarity.calibration
    report["unfamiliar"], report["unfamiliar_threshold"] = [], 1.0  # scores: over threshold
    if len(y["test"]):  # the test images beyond it (report.html shows them)
        test_f = (
            inputs["test"]
            if cached
            else pooled_features(model, inputs["test"], config.batch_size, extract=extract)
        )
        for ref, score, t, p in zip(
            samples.test, familiarity.scores(test_f), y["test"], probs, strict=True
        ):
            if score > 1:
                report["unfamiliar"].append(
                    {
                        "file": str(ref.path),
                        "page": int(ref.page),
                        "score": round(float(score), 4),
                        "true": names[t],
                        "predicted": names[int(p.argmax())],
                        "confidence": round(float(p.max()), 4),
                    }
                )
    emit(
        Message(
            f"Unfamiliar images: threshold {familiarity.threshold:.2f} (feature distance "
            f"at the {cal['source']} images' 99th percentile, {cal['n']} images; "
            f"{fit_seconds:.1f}s); {len(report['unfamiliar'])} of {len(y['test'])} test "
            "images beyond it"
        )
    )

    meta = {
        "format": f"{BUNDLE_FORMAT}/{BUNDLE_VERSION}",
        "class_names": names,
        "input_size": [config.image_size, config.image_size, 3],
        "preprocessing": spec.to_dict(),
        "backbone": backbone,
        "weights": weights or "none",
        "weights_id": weights_id,
        "fine_tune": fine_tune,
        "phases": fit.phases,
        "cached_features": reads_cached_features(config, fine_tune, weights),
        # what computed the cached features and the test report
        "engine": {
            "features": (
                engine_label(engine) if reads_cached_features(config, fine_tune, weights) else None
            ),
            "evaluation": engine_label(engine),
        },
        "config": config.to_dict(),
        "history": history,
        "epochs_run": reporter.epochs_run,
        "class_distribution": {names[k]: v for k, v in distribution.items()},
        "class_weights": ({names[k]: v for k, v in class_weight.items()} if class_weight else None),
        "split": {
            "file": str(Path(config.data_dir).resolve() / SPLIT_FILE),
            **{
                k: v
                for k, v in samples.split.to_dict().items()
                if k in ("version", "val_fraction", "test_fraction", "seed", "group_by")
            },
            "own_files": SPLIT_FILE,
        },
        "metrics": {k: report[k] for k in ("n", "accuracy", "per_class", "confusion_matrix")},
        "familiarity": familiarity.meta(),
        "versions": versions(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "data_dir": str(Path(config.data_dir).resolve()),
    }
    crop = dataset_crop_spec(config.data_dir)
    if crop is not None:  # a dataset of objects: prediction cuts the same crops from labels
        meta["objects"] = {"crop": crop.to_dict()}
    report["model"] = describe_model(meta)
    extra = report_files(report)
    extra[FAMILIARITY_FILE] = familiarity.to_bytes()
    manifest = split_manifest(config.data_dir, samples.split)
    extra[SPLIT_FILE] = json.dumps(manifest, indent=1)
    # report.html is one of the bundle's own files: a retraining moves it into previous/
    extra[REPORT_HTML] = render_report_html(meta, report, manifest)
    if ov_model is not None:  # predictions need no conversion (nor TensorFlow) later
        extra[IR_XML], extra[IR_BIN] = ir_bytes(ov_model)
        meta["openvino"] = {"xml": IR_XML, "outputs": [FEATURE_LAYER]}
    bundle = write_bundle(config.out_dir, model, meta, extra)
    if report["accuracy"] is not None:
        emit(
            Message(
                f"Test accuracy: {report['accuracy']:.4f} on {report['n']} images"
                + (f" from {report['groups']} groups" if report.get("groups") else "")
                + f"; balanced accuracy {report['balanced_accuracy']:.4f}, macro-F1 "
                f"{report['macro_f1']:.4f}"
            )
        )
    if report.get("tta"):
        tta = report["tta"]
        emit(
            Message(
                f"Test accuracy with flips (TTA): {tta['accuracy']:.4f} (plain "
                f"{tta['plain_accuracy']:.4f}; {tta['views']} views per image, "
                f"{tta['seconds']:.1f}s)"
            )
        )
    for f in report["diagnosis"]:
        emit(Message(f"{f['finding']}: {f['evidence'].rstrip('.')}. {f['remedy']}"))
    emit(Message(f"Model saved to {bundle}"))
    return TrainResult(
        bundle,
        names,
        history,
        report,
        False,
        reporter.epochs_run,
        time.perf_counter() - t_start,
        meta,
    )


class _Fitter:
    """One ``fit`` per phase, with the same reporter, LR reduction and early stopping."""

    def __init__(self, config: TrainConfig, y: dict, class_weight, reporter):
        self.config, self.y, self.class_weight, self.reporter = config, y, class_weight, reporter
        self.phases: list[dict] = []
        self.reserve_s = 0.0  # a time budget's seconds kept for the test and the saving

    def _budget_said(self, first: int, budget: str | None):
        """What a time budget's first epoch decided, said and shown as the new total."""

        def said(epochs: int, seconds: float):
            self.reporter.epochs = first + epochs
            self.reporter.emit(
                Message(
                    f"Time budget {budget}: {epochs} fine-tuning epoch(s) of {seconds:.0f}s "
                    f"fit (epochs {first + 1}-{first + epochs})"
                )
            )

        return said

    def _monitored(self, monitor: str) -> str:
        words = monitor.replace("_", " ").replace("val ", "validation ")
        return words + (" (class-weighted)" if self.class_weight else "")

    def run(
        self,
        model,
        inputs: dict,
        cached: bool,
        lr: float,
        first: int,
        last: int,
        phase: int,
        net=None,
        t_start: float | None = None,
    ):
        """Train epochs ``first+1..last``; returns the model that maps inputs to classes.

        ``cached``: ``inputs`` are pooled features and the head alone trains; ``net``: the
        model to train on ``inputs``' rows (the open stages on cached activations). Phase 2
        follows ``fine_tune_schedule``, with label smoothing; a ``time_budget`` counts from
        ``t_start``."""
        import keras
        import tensorflow as tf

        config, y = self.config, self.y
        trained = (
            net
            if net is not None
            else build_head(model, inputs["train"].shape[-1])
            if cached
            else model
        )
        rows = cached or net is not None  # arrays gathered by rows, not pages read from files
        n_classes = int(trained.output_shape[-1])
        cosine = phase == 2 and config.fine_tune_schedule == "cosine"
        trained.compile(
            optimizer=(
                keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
                if cosine
                else keras.optimizers.Adam(lr)
            ),
            loss=smoothed_loss(config.label_smoothing if phase == 2 else 0.0, n_classes),
            metrics=["accuracy", *epoch_metrics(n_classes)],
            run_eagerly=runs_eagerly(
                rows, len(y["train"]), config.batch_size, last - first, config.image_size
            ),
        )
        # The page order is shuffled each epoch (same seed, same order as shuffling the
        # arrays); rows or pages are read per batch, so neither cached features (maybe
        # memory-mapped) nor images are ever copied whole into the pipeline.
        bs = config.batch_size
        # on several devices, a last batch too short to give each one an image is left out
        n_devices = replicas()
        n_train, n_val = (even_count(len(y[s]), bs, n_devices) for s in ("train", "val"))
        if n_val < len(y["val"]):
            self.reporter.emit(
                Message(
                    f"The last {len(y['val']) - n_val} of {len(y['val'])} validation images "
                    f"are left out of validation: a batch must give each of the {n_devices} "
                    "devices an image."
                )
            )
        order = EpochOrder(len(y["train"]), config.seed + phase - 1)
        if cached and config.epoch_views == "all":
            # Each epoch of the head sees every cached view of every training image, as a
            # logistic regression on the same features would: one view drawn per image and
            # epoch left it 0.04 macro-F1 below one (105 plankton images, 5-fold; see
            # docs/validity.md). An epoch of the head still takes about a second on 2,100
            # images with 4 views.
            feats = inputs["train"]  # (images, views, D): a view of it, never a copy
            flat = feats.reshape(-1, feats.shape[-1])
            labels = np.repeat(y["train"], feats.shape[1])
            n_rows = even_count(len(labels), bs, n_devices)
            order = EpochOrder(len(labels), config.seed + phase - 1)
            train_ds = gather_dataset(flat, labels, bs, order, limit=n_rows)
        elif rows:  # each epoch sees one of the cached views of every training image
            n_rows = n_train
            train_ds = gather_dataset(
                inputs["train"], y["train"], bs, order, config.seed, limit=n_train
            )
        else:
            n_rows = n_train
            train_ds = inputs["train"].dataset(bs, y["train"], order, limit=n_train)
        self.reporter.steps = steps = -(-n_rows // bs)
        has_val = n_val > 0
        val_ds = None
        if has_val:
            val_ds = (
                gather_dataset(inputs["val"], y["val"], bs, None, limit=n_val)
                if rows
                else inputs["val"].dataset(bs, y["val"], limit=n_val)
            )
            if self.class_weight:  # the validation loss weighs the classes as training does
                table = tf.constant(
                    [self.class_weight.get(c, 0.0) for c in range(n_classes)], tf.float32
                )
                val_ds = val_ds.map(lambda x, label: (x, label, tf.gather(table, label)))
        monitor = "val_loss" if has_val else "loss"
        callbacks = [order.callback(), self.reporter]
        if cosine:
            budget = parse_duration(config.time_budget)
            callbacks.insert(
                0,  # before the reporter, which reads the batch's learning rate
                make_schedule(
                    lr,
                    WARMUP_EPOCHS,
                    first,
                    last,
                    steps,
                    budget,
                    t_start if t_start is not None else time.perf_counter(),
                    self.reserve_s,
                    self._budget_said(first, config.time_budget),
                ),
            )
        else:
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor,
                    factor=config.reduce_lr_factor,
                    patience=config.reduce_lr_patience,
                    min_lr=config.min_lr,
                    verbose=0,
                )
            )
        early = None
        if config.early_stopping:
            early = keras.callbacks.EarlyStopping(
                monitor=monitor,
                # a loss lower by less than this is no better: once the learning rate is
                # cut to its floor, such gains would keep a converged head running
                min_delta=EARLY_STOPPING_MIN_DELTA,
                patience=config.early_stopping_patience,
                restore_best_weights=True,
                verbose=0,
            )
            callbacks.append(early)
        history = self.reporter.history
        n_before = len(history.get("loss", []))
        self.reporter.phase = phase
        try:
            trained.fit(
                train_ds,
                validation_data=val_ds,
                epochs=last,
                initial_epoch=first,
                class_weight=self.class_weight,
                callbacks=callbacks,
                shuffle=False,
                verbose=0,
            )  # tf.data shuffles
        except tf.errors.OpError:
            # a page that could not be read inside the pipeline: say which, not TF's trace
            failed = [s.failure for s in inputs.values() if getattr(s, "failure", None)]
            if failed:
                raise failed[0] from None
            raise
        ran = len(history.get("loss", [])) - n_before
        base_trains = any(w.trainable for w in base_layer(model).weights)
        info = {
            "phase": phase,
            "epochs": [first + 1, first + ran],
            "learning_rate": lr,
            "schedule": "warm-up and cosine (AdamW)" if cosine else "plateau (Adam)",
            "trained": "head on cached features"
            if cached
            else "head and unfrozen stages on cached activations"
            if net is not None
            else ("head and unfrozen stages" if base_trains else "head on the frozen base"),
        }
        if (
            early is not None
            and early.stopped_epoch == 0
            and early.best_weights is not None
            and early.best_epoch + 1 < first + ran
            and not self.reporter.stopped
        ):  # the last epoch came first; Keras restores only when it stops early
            trained.set_weights(early.best_weights)
            info["best_epoch"] = early.best_epoch + 1
            self.reporter.emit(
                Message(
                    f"Ran all {first + ran} epochs; the weights of epoch {early.best_epoch + 1} "
                    f"(the best {self._monitored(monitor)}) are kept."
                )
            )
        info["kept_epoch"] = info.get("best_epoch", first + ran)
        if early is not None and early.stopped_epoch > 0 and not self.reporter.stopped:
            best = early.best_epoch + 1
            info["kept_epoch"] = best
            info["early_stopped"] = {"after_epoch": first + ran, "best_epoch": best}
            self.reporter.emit(
                Message(
                    f"Early stopping after epoch {first + ran}: the {self._monitored(monitor)} "
                    f"stopped improving; the weights of epoch {best} (the best) are kept."
                )
            )
        self.phases.append(info)
        return trained


def _images(config: TrainConfig, samples) -> dict:
    """Each subset's pages as a :class:`~.pipeline.PageSource`: read from the files as the
    training needs them, never all in memory (see core/pipeline.py)."""
    spec = config.preprocessing
    memo = PageMemo(page_memory_budget())  # small datasets: decoded once, as before
    return {s: PageSource(getattr(samples, s), spec, memo) for s in ("train", "val", "test")}


def _activations(config: TrainConfig, samples, model, fine_tune: int, emit, should_stop):
    """Phase 2 on cached activations (see core/finetune.py): ``(inputs, top, reserve_s)``
    with the training images' ``fine_tune_views`` views and the validation images at the
    boundary of the frozen stages, the model of the open stages and the head, and the
    seconds a time budget keeps for testing and saving; None when stopped."""
    lower, top = split_classifier(model, fine_tune)
    spec = config.preprocessing  # each page read once, in chunks: nothing to memoise
    plan = [("train", config.fine_tune_views if config.augment else 1), ("val", 1)]
    total = sum(len(getattr(samples, s)) * v for s, v in plan)
    out, done, t0 = {}, 0, time.perf_counter()
    strength = config.augment_strength if config.augment else 0.0
    for subset, views in plan:
        before = done

        def on_batch(n, views=views, before=before):
            seconds = time.perf_counter() - t0
            rate = (before + n * views) / seconds if seconds > 0 else None
            left = total - before - n * views
            emit(
                Progress(
                    "activations", before + n * views, total, rate, left / rate if rate else None
                )
            )
            return bool(should_stop and should_stop())

        source = PageSource(getattr(samples, subset), spec)
        acts = boundary_activations(
            source, lower, views, strength, config.seed, config.batch_size, on_batch
        )
        if acts is None:
            return None
        out[subset] = acts if subset == "train" else acts[:, 0]  # validation: the image
        done += len(source) * views
    seconds = time.perf_counter() - t0
    rate = done / seconds if seconds > 0 else 50.0
    shape = "x".join(str(d) for d in out["val"].shape[1:]) if len(out["val"]) else "?"
    emit(
        Message(
            f"Frozen stages: {len(samples.train)} training image(s) x {out['train'].shape[1]} "
            f"view(s) and {len(samples.val)} validation image(s) at the boundary ({shape}, "
            f"float16) in {seconds:.1f}s; the top {fine_tune} stage(s) train on them"
        )
    )
    # the test set (plain and 4 flipped views, the whole network) and the saving
    reserve = 60.0 + 8.0 * len(samples.test) / rate
    return out, top, reserve


def _features(
    config: TrainConfig,
    samples,
    model,
    weights_id: str,
    emit,
    should_stop,
    subsets=("train", "val", "test"),
    engine: str = "tensorflow",
    converted: dict | None = None,
) -> dict | None:
    """Backbone features from the dataset's cache, computing only what is missing; with
    ``converted``, its ``"backbone"`` is the OpenVINO backbone used (None on TensorFlow)."""
    spec = config.preprocessing
    views = 1 + (config.views if config.augment else 0)
    strength = config.augment_strength if config.augment else None
    key = cache_key(spec, weights_id, config.seed, strength, engine)
    fields = key_fields(spec, weights_id, config.seed, strength, engine)
    cache = FeatureCache(config.data_dir, key, fields)
    cache.touch()
    removed = prune_cache(config.data_dir, keep=key)
    if removed:
        emit(
            Message(
                f"Feature cache: removed {len(removed)} folder(s) unused for 30 days or "
                "beyond the size cap."
            )
        )
    extractor = FeatureExtractor(
        model,
        config.seed,
        config.augment_strength,
        config.batch_size,
        engine=engine,
        weights_id=weights_id,
    )
    if converted is not None:
        converted["backbone"] = extractor.ov_model
    plan = [(s, views if s == "train" else 1) for s in subsets]
    earlier = {"done": 0, "last": 0}  # images of the subsets already finished

    def progress(done, total, seconds):
        rate = done / seconds if seconds > 0 else None
        earlier["last"] = total
        emit(
            Progress(
                "features",
                earlier["done"] + done,
                earlier["done"] + total,
                rate,
                (total - done) / rate if rate else None,
            )
        )

    out = {}
    t0 = time.perf_counter()
    for subset, n_views in plan:
        refs = getattr(samples, subset)
        feats = extract_features(refs, n_views, spec, extractor, cache, progress, should_stop)
        if feats is None:
            return None
        out[subset] = feats if subset == "train" else feats[:, 0]
        earlier["done"] += earlier["last"]
        earlier["last"] = 0
    if cache.unwritable:
        emit(
            Message(
                f"Could not write the feature cache in {cache.folder} ({cache.unwritable})"
                "; features will be computed again next time.",
                "warning",
            )
        )
    emit(
        Message(
            f"Backbone features: {cache.computed} image(s) computed, {cache.hits} "
            f"reused from the cache ({views} view(s) per training image) in "
            f"{time.perf_counter() - t0:.1f}s"
        )
    )
    return out
