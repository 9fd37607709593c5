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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# a bundle keeps its own train/val/test files and hashes under the dataset's file name
from .dataset import SPLIT_FILE, load_samples
from .errors import DeviceError, OutputError
from .features import DEFAULT_VIEWS, remove_stale_temporaries
from .images import PreprocessSpec
from .preflight import preflight


def _opt(default, help: str, cli: str | None = None, **extra):
    """A setting with its one description: the CLI's help and the widget's tip come from it.

    An on/off setting whose flag turns it off (``cli="--no-augment"``) also has ``off``, the
    help of that flag."""
    return field(default=default, metadata={"help": help, "cli": cli, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the training guide's.

    Each field's ``metadata["help"]`` is its only description: ``microclf train --help`` and
    the Train widget's tips are made from it.

    Examples
    --------
    >>> from napari_microclf import TrainConfig, train
    >>> result = train(TrainConfig("dataset", out_dir="model", epochs=15))  # doctest: +SKIP
    """

    data_dir: str
    out_dir: str = "microclf-model"
    epochs: int = _opt(15, "passes over the training set (15; 10-20 for small datasets)")
    batch_size: int = _opt(32, "images per step (32; 8-16 for under 100 images per class)")
    learning_rate: float = _opt(
        1e-4, "starting learning rate (1e-4), reduced when the validation loss plateaus"
    )
    image_size: int = _opt(
        224,
        "model input side in pixels, each image padded (never "
        "cropped) and resized to it (224, what ImageNet weights expect)",
    )
    val_split: float = _opt(
        0.2,
        "validation fraction or percent (0.2), measured after each epoch (val_loss, val_accuracy)",
        parse="fraction",
    )
    test_split: float = _opt(
        0.1,
        "test fraction or percent (0.1), kept apart until the "
        "end: the test accuracy is the true performance",
        parse="fraction",
    )
    augment: bool = _opt(
        True,
        "random flips, rotation, zoom and contrast of the training images",
        cli="--no-augment",
        off="no flips/rotation/zoom/contrast",
    )
    augment_strength: float = _opt(
        0.05, "rotation/zoom/contrast range (0.05 = ±5%%; 0.1-0.2 for larger datasets)"
    )
    dropout: float = _opt(
        0.2,
        "dropout before the last layer (0.2; 0.3-0.4 for very small "
        "datasets, 0.1-0.2 for large ones; a remedy for overfitting)",
    )
    class_weights: bool = _opt(
        True,
        "rarer classes weigh more in the loss (balanced class weights)",
        cli="--no-class-weights",
        off="do not weight rare classes more",
    )
    early_stopping: bool = _opt(
        True,
        "stop when the validation loss has not improved for 5 "
        "epochs and keep the best epoch's weights",
        cli="--no-early-stopping",
        off="always run every epoch (no early stopping)",
    )
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.2
    min_lr: float = 1e-7
    backbone: str = _opt(
        "efficientnet-b0",
        "efficientnet-b0 (the guide's) or "
        "efficientnet-lite0 (ImageNet weights installed with microclf, no "
        "network needed)",
        choices=("efficientnet-b0", "efficientnet-lite0"),
    )
    weights: str | None = _opt(
        "auto",
        "'auto' (ImageNet B0 if in the Keras cache or "
        "downloadable, else ImageNet Lite0), 'imagenet', a .h5 file, "
        "or 'none'",
    )
    fine_tune: int | str = _opt(
        0,
        "unfreeze the top N of 7 stages, or 'all' (0: frozen "
        "base); a pretrained base first trains its head frozen",
    )
    head_epochs: int = _opt(
        5,
        "fine-tuning, phase 1: epochs of the head on the frozen base "
        "before the top stages unfreeze (5)",
    )
    fine_tune_lr_factor: float = _opt(
        0.1, "fine-tuning, phase 2: learning rate multiplied by this (0.1)"
    )
    seed: int = _opt(0, "random seed of the split, the augmentation and the head (0)")
    pmin: float = 1.0
    pmax: float = 99.8
    intensity: str = _opt(
        "percentile",
        "'percentile' (1-99.8%% per channel), 'fixed' "
        "(the dtype's range) or 'fixed:MIN,MAX' to keep absolute "
        "brightness",
        parse="intensity",
    )
    intensity_range: tuple | None = None
    channel_map: tuple | None = _opt(
        None, "channel map to RGB, e.g. '0,1,-' (auto)", cli="--channels", parse="channels"
    )
    resize_mode: str = _opt(
        "pad",
        "pad to square then resize (no cropping), or stretch",
        cli="--resize",
        choices=("pad", "stretch"),
    )
    group_by: str | None = _opt(
        None,
        "regular expression taking an image's group from its "
        "file name, e.g. '^(plate\\d+_well[A-Z]\\d+)'; images of a group "
        "stay in one subset (default: the source file)",
    )
    resplit: bool = _opt(False, "draw a new split.json (the test set changes)")
    # Frozen base: train the head on backbone features computed once (cached in the
    # dataset) for each image and `views` augmented views of it.
    cache: bool = _opt(
        True,
        "frozen base: compute the backbone's features once per image "
        "and view and keep them in the dataset (fast retraining)",
        cli="--no-cache",
        off="frozen base: run the full pipeline every epoch instead of cached backbone features",
    )
    views: int = _opt(
        DEFAULT_VIEWS,
        f"augmented views per training image whose backbone features are cached ({DEFAULT_VIEWS})",
    )
    engine: str = _opt(
        "auto",
        "what runs the frozen backbone's features and the test-set evaluation: 'auto' "
        "(OpenVINO when installed, else TensorFlow), 'openvino' or 'tensorflow'; the "
        "training itself runs on TensorFlow",
        choices=("auto", "openvino", "tensorflow"),
    )
    devices: str = _opt(
        "all",
        "GPUs to train on: 'all' or numbers such as '0,1'; with two or more, each batch "
        "is split across them (MirroredStrategy) at the same learning rate",
    )

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        from .device import parse_devices

        parse_devices(self.devices)  # a bad spelling is said now, not after the images load
        from .engine import check_engine

        object.__setattr__(self, "engine", check_engine(self.engine))  # frozen dataclass
        if self.views < 0:
            raise ValueError(f"views must be 0 or more, got {self.views}")
        if not 0 <= self.augment_strength <= 0.5:
            raise ValueError(
                f"augmentation strength must be in [0, 0.5], got {self.augment_strength}"
            )
        if self.head_epochs < 0:
            raise ValueError(f"head epochs must be 0 or more, got {self.head_epochs}")
        if not 0 < self.fine_tune_lr_factor <= 1:
            raise ValueError(
                f"fine-tuning learning-rate factor must be in (0, 1], got "
                f"{self.fine_tune_lr_factor}"
            )
        if ":" in self.intensity or "," in self.intensity:  # "fixed:0,4095" in one string
            from .images import parse_intensity

            mode, rng = parse_intensity(self.intensity)
            object.__setattr__(self, "intensity", mode)
            object.__setattr__(self, "intensity_range", rng)
        if self.intensity_range is not None:
            object.__setattr__(self, "intensity_range", tuple(self.intensity_range))
        if self.group_by:
            import re

            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise ValueError(
                    f"group-by pattern {self.group_by!r} is not a valid regular expression ({exc})"
                ) from None
        self.preprocessing  # noqa: B018 - checks the preprocessing settings now

    @property
    def preprocessing(self) -> PreprocessSpec:
        return PreprocessSpec(
            self.image_size,
            self.pmin,
            self.pmax,
            self.channel_map,
            self.resize_mode,
            self.intensity,
            self.intensity_range,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def help_of(name: str) -> str:
    """The one description of a TrainConfig setting (CLI help, widget tip)."""
    return TrainConfig.__dataclass_fields__[name].metadata.get("help", "").replace("%%", "%")


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
    """The training guide's advice for very small (< 100), medium (100-1000) and large
    (> 1000) datasets, as settings. Every value stays editable."""
    if n_images < 100:
        return Preset(
            "very small dataset",
            n_images,
            f"{n_images} images, under 100",
            {
                "augment": True,
                "augment_strength": 0.1,
                "learning_rate": 5e-5,
                "batch_size": 8,
                "dropout": 0.35,
                "fine_tune": 0,
                "epochs": 15,
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
                "learning_rate": 1e-4,
                "batch_size": 32,
                "dropout": 0.2,
                "fine_tune": 0,
                "epochs": 15,
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
            "dropout": 0.15,
            "fine_tune": 2,
            "epochs": 15,
        },
    )


def count_images(data_dir: str | Path) -> int:
    """Pages in the dataset's class folders (a multi-page file counts each page)."""
    from .dataset import class_files, list_classes
    from .images import ImageReadError, count_pages

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
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            parts.append(f"{key}: {logs[key]:.4f}")
    if lr is not None:
        parts.append(f"lr: {lr:.4e}")
    ms = 1000 * seconds / max(steps, 1)
    parts += [f"{seconds:.0f}s/epoch", f"{ms:.0f}ms/step"]
    return " - ".join(parts)


def balanced_class_weights(distribution: dict[int, int]) -> dict[int, float]:
    """n_samples / (n_classes * n_class): rarer classes weigh more."""
    total, k = sum(distribution.values()), len(distribution)
    return {c: (total / (k * n) if n else 0.0) for c, n in distribution.items()}


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

        def _check_stop(self):
            if should_stop is not None and should_stop():
                self.stopped = True
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            emit(EpochStart(epoch + 1, epochs))
            self._check_stop()

        def on_train_batch_end(self, batch, logs=None):
            emit(BatchEnd(self._epoch_now(), epochs, batch + 1, steps, _floats(logs)))
            self._check_stop()

        def _epoch_now(self):
            return self.epochs_run + 1

        def on_epoch_end(self, epoch, logs=None):
            if self.stopped:  # a stopped epoch is not a finished one
                return
            seconds = time.perf_counter() - self._t0
            logs = _floats(logs)
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                if key in logs:
                    history.setdefault(key, []).append(logs[key])
            history.setdefault("lr", []).append(lr)
            history.setdefault("phase", []).append(self.phase)
            self.epochs_run = epoch + 1
            emit(
                EpochEnd(
                    epoch + 1,
                    epochs,
                    steps,
                    seconds,
                    logs,
                    format_epoch_line(steps, seconds, logs, lr),
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
    from functools import wraps

    @wraps(fn)
    def locked(config, on_update=None, should_stop=None):
        from .lock import model_lock
        from .model import repair_model_folder

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
    from functools import wraps

    @wraps(fn)
    def kept(*args, **kwargs):
        import random

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
    from .model import META_FILE

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
    from .device import configure_gpus

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
    return fine_tune != 0 and weights is not None and config.head_epochs > 0 and config.epochs > 1


def reads_cached_features(config: TrainConfig, fine_tune: int, weights) -> bool:
    """Whether the training (or its first phase) trains the head on cached features."""
    return config.cache and (fine_tune == 0 or has_head_phase(config, fine_tune, weights))


@contextlib.contextmanager
def _on_devices(config: TrainConfig, emit):
    """Run the training inside a MirroredStrategy's scope when ``config.devices`` names two or
    more devices (:func:`~.device.distribution`), saying so; else on TensorFlow's default."""
    from .device import distribution

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
    from .dataset import split_manifest
    from .evaluate import (
        classification_report,
        describe_model,
        diagnose,
        model_probabilities,
        report_files,
        tta_summary,
    )
    from .model import (
        BUNDLE_FORMAT,
        BUNDLE_VERSION,
        FROZEN_RANDOM_WARNING,
        build_classifier,
        parse_fine_tune,
        resolve_weights,
        set_fine_tune,
        versions,
        weights_identity,
        write_bundle,
    )

    if n_stale := remove_stale_temporaries(config.data_dir):
        emit(Message(f"Removed {n_stale} half-written cache file(s) left by an interrupted run."))
    resolved = resolve_weights(config.backbone, config.weights)
    if resolved.note:
        emit(Message(resolved.note, resolved.level))
    if resolved.weights is None and str(config.weights).lower() == "auto":
        config = dataclasses.replace(config, **{**FROM_SCRATCH, "epochs": config.epochs})
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
    from .engine import classifier_forward, engine_label, resolve_engine

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
    class_weight = None
    if config.class_weights:
        class_weight = balanced_class_weights(distribution)
        emit(Message(f"Class weights: { {k: round(v, 2) for k, v in class_weight.items()} }"))

    # Fine-tuning a pretrained base starts from a head trained on the frozen base.
    two_phase = has_head_phase(config, fine_tune, weights)
    head_epochs = min(config.head_epochs, config.epochs - 1) if two_phase else config.epochs
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
    reporter = _make_callback(config.epochs, steps, emit, should_stop, history)
    fit = _Fitter(config, y, class_weight, reporter)
    # Phase 1 (or the only phase). With cached features only the head is trained; it shares
    # the classifier's layers.
    trained = fit.run(model, inputs, cached, config.learning_rate, 0, head_epochs, phase=1)
    if reporter.stopped:
        return stopped_result(names, history, reporter.epochs_run)
    if two_phase:
        lr2 = config.learning_rate * config.fine_tune_lr_factor
        stages = "all stages" if fine_tune == -1 else f"the top {fine_tune} of 7 stages"
        emit(
            PhaseStart(
                2,
                reporter.epochs_run + 1,
                f"Phase 2: fine-tuning {stages} from the trained head, learning rate "
                f"{lr2:.1e}, epochs {reporter.epochs_run + 1}-{config.epochs}",
            )
        )
        set_fine_tune(model, fine_tune)
        if cached:  # phase 2 needs the images themselves
            inputs = _images(config, samples)
        trained = fit.run(model, inputs, False, lr2, reporter.epochs_run, config.epochs, phase=2)
        cached = False
        if reporter.stopped:
            return stopped_result(names, history, reporter.epochs_run)

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
            probs = trained.predict(inputs["test"], batch_size=config.batch_size, verbose=0)
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
    report["diagnosis"] = diagnose(history, report)
    # where the training data lie in feature space, to flag unfamiliar images (familiar.py)
    from .familiar import FAMILIARITY_FILE, fit_for_training

    familiarity, fit_seconds = fit_for_training(
        model, inputs, y, len(names), cached, config.batch_size, config.seed, forward
    )
    cal = familiarity.calibration
    report["unfamiliar"], report["unfamiliar_threshold"] = [], 1.0  # scores: over threshold
    if len(y["test"]):  # the test images beyond it (report.html shows them)
        from .familiar import pooled_features

        test_f = (
            inputs["test"]
            if cached
            else pooled_features(model, inputs["test"], config.batch_size, forward)
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
    report["model"] = describe_model(meta)
    extra = report_files(report)
    extra[FAMILIARITY_FILE] = familiarity.to_bytes()
    manifest = split_manifest(config.data_dir, samples.split)
    extra[SPLIT_FILE] = json.dumps(manifest, indent=1)
    # report.html is one of the bundle's own files: a retraining moves it into previous/
    from .report_html import REPORT_HTML, render_report_html

    extra[REPORT_HTML] = render_report_html(meta, report, manifest)
    if ov_model is not None:  # predictions need no conversion (nor TensorFlow) later
        from .engine import IR_BIN, IR_XML, ir_bytes
        from .familiar import FEATURE_LAYER

        extra[IR_XML], extra[IR_BIN] = ir_bytes(ov_model)
        meta["openvino"] = {"xml": IR_XML, "outputs": [FEATURE_LAYER]}
    bundle = write_bundle(config.out_dir, model, meta, extra)
    if report["accuracy"] is not None:
        emit(
            Message(
                f"Test accuracy: {report['accuracy']:.4f} on {report['n']} images"
                + (f" from {report['groups']} groups" if report.get("groups") else "")
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

    def run(self, model, inputs: dict, cached: bool, lr: float, first: int, last: int, phase: int):
        """Train epochs ``first+1..last``; returns the model that maps inputs to classes."""
        import keras
        import tensorflow as tf

        from .model import base_layer, build_head
        from .pipeline import EpochOrder, gather_dataset

        config, y = self.config, self.y
        trained = build_head(model, inputs["train"].shape[-1]) if cached else model
        trained.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        # The page order is shuffled each epoch (same seed, same order as shuffling the
        # arrays); rows or pages are read per batch, so neither cached features (maybe
        # memory-mapped) nor images are ever copied whole into the pipeline.
        bs = config.batch_size
        order = EpochOrder(len(y["train"]), config.seed + phase - 1)
        if cached:  # each epoch sees one of the cached views of every training image
            train_ds = gather_dataset(inputs["train"], y["train"], bs, order, config.seed)
        else:
            train_ds = inputs["train"].dataset(bs, y["train"], order)
        has_val = len(y["val"]) > 0
        val_ds = None
        if has_val:
            val_ds = (
                gather_dataset(inputs["val"], y["val"], bs, None)
                if cached
                else inputs["val"].dataset(bs, y["val"])
            )
        monitor = "val_loss" if has_val else "loss"
        callbacks = [
            order.callback(),
            self.reporter,
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor,
                factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience,
                min_lr=config.min_lr,
                verbose=0,
            ),
        ]
        early = None
        if config.early_stopping:
            early = keras.callbacks.EarlyStopping(
                monitor=monitor,
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
            "trained": "head on cached features"
            if cached
            else ("head and unfrozen stages" if base_trains else "head on the frozen base"),
        }
        if early is not None and early.stopped_epoch > 0 and not self.reporter.stopped:
            best = early.best_epoch + 1
            info["early_stopped"] = {"after_epoch": first + ran, "best_epoch": best}
            self.reporter.emit(
                Message(
                    f"Early stopping after epoch {first + ran}: the {monitor.replace('_', ' ')} "
                    f"stopped improving; the weights of epoch {best} (the best) are kept."
                )
            )
        self.phases.append(info)
        return trained


def _images(config: TrainConfig, samples) -> dict:
    """Each subset's pages as a :class:`~.pipeline.PageSource`: read from the files as the
    training needs them, never all in memory (see core/pipeline.py)."""
    from .pipeline import PageMemo, PageSource, page_memory_budget

    spec = config.preprocessing
    memo = PageMemo(page_memory_budget())  # small datasets: decoded once, as before
    return {s: PageSource(getattr(samples, s), spec, memo) for s in ("train", "val", "test")}


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
    from .features import (
        FeatureCache,
        FeatureExtractor,
        cache_key,
        extract_features,
        key_fields,
        prune_cache,
    )

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
