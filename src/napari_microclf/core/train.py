"""Training: ``train(config, on_update=None, should_stop=None) -> TrainResult``.

Plain and callable from a notebook; the napari widget and the CLI consume the same typed
updates. ``on_update`` is called from the training thread with :class:`Message`,
:class:`Progress`, :class:`EpochStart`, :class:`BatchEnd` and :class:`EpochEnd` objects.
``should_stop()`` is polled after every batch (and every image while loading); a stopped or
failed training writes nothing, so an earlier model bundle stays as it was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import load_samples
from .features import DEFAULT_VIEWS
from .images import PreprocessSpec, preprocess_refs


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the training guide's."""

    data_dir: str
    out_dir: str = "microclf-model"
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-4
    image_size: int = 224
    val_split: float = 0.2
    test_split: float = 0.1
    augment: bool = True
    augment_strength: float = 0.05  # rotation/zoom/contrast of ±5%; flips always
    dropout: float = 0.2
    class_weights: bool = True
    early_stopping: bool = True
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.2
    min_lr: float = 1e-7
    weights: str | None = "imagenet"  # "imagenet", a .h5 file, or None
    fine_tune: int | str = 0  # 0: frozen base; 1-7: top stages; "all"
    seed: int = 0
    pmin: float = 1.0
    pmax: float = 99.8
    channel_map: tuple | None = None
    resize_mode: str = "pad"
    resplit: bool = False
    # Frozen base: train the head on backbone features computed once (cached in the
    # dataset) for each image and `views` augmented views of it. Fine-tuning ignores this.
    cache: bool = True
    views: int = DEFAULT_VIEWS

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.views < 0:
            raise ValueError(f"views must be 0 or more, got {self.views}")
        if not 0 <= self.augment_strength <= 0.5:
            raise ValueError(f"augmentation strength must be in [0, 0.5], got "
                             f"{self.augment_strength}")

    @property
    def preprocessing(self) -> PreprocessSpec:
        return PreprocessSpec(self.image_size, self.pmin, self.pmax, self.channel_map,
                              self.resize_mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Without pretrained weights a frozen base learns nothing; this is the recipe that trains the
# whole network from scratch reliably on the sample data (150 images per class: test accuracy
# 0.87-0.91 over two seeds, about a minute on 2 cores). The demo and the Train widget offer it
# when the ImageNet weights are not in the Keras cache.
FROM_SCRATCH = {"weights": "none", "fine_tune": "all", "image_size": 48, "batch_size": 16,
                "learning_rate": 1e-3, "epochs": 20, "augment": False, "early_stopping": False,
                "reduce_lr_patience": 20}


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
            self.epochs_run = epoch + 1
            emit(EpochEnd(epoch + 1, epochs, steps, seconds, logs,
                          format_epoch_line(steps, seconds, logs, lr),
                          {k: list(v) for k, v in history.items()}))

    return _Reporter()


def _floats(logs) -> dict:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


# -- train ------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    on_update: Callable[[object], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a classifier on ``config.data_dir`` and write the bundle to ``config.out_dir``."""
    import keras
    import tensorflow as tf

    from .evaluate import classification_report, diagnose, report_files
    from .model import (
        FROZEN_RANDOM_WARNING,
        build_classifier,
        build_head,
        normalize_weights,
        parse_fine_tune,
        versions,
        write_bundle,
    )

    t_start = time.perf_counter()

    def emit(update):
        if on_update is not None:
            on_update(update)

    def stopped_result(names, history, epochs_run=0):
        emit(Message("Training stopped: no model was written"
                     + (f" ({config.out_dir} is unchanged)." if Path(config.out_dir).exists()
                        else "."), "warning"))
        return TrainResult(None, names, history, None, True, epochs_run,
                           time.perf_counter() - t_start)

    weights = normalize_weights(config.weights)
    fine_tune = parse_fine_tune(config.fine_tune)
    samples = load_samples(config.data_dir, config.val_split, config.test_split, config.seed,
                           config.resplit)
    names = samples.class_names
    for note in samples.notes:
        emit(Message(note))
    if weights is None and fine_tune == 0:
        emit(Message(FROZEN_RANDOM_WARNING, "warning"))
    spec = config.preprocessing
    emit(Message(f"Classes: {dict(enumerate(names))}"))
    emit(Message(f"Images: {len(samples.train)} train, {len(samples.val)} validation, "
                 f"{len(samples.test)} test"))

    distribution = samples.distribution("train")
    emit(Message(f"Class distribution: {distribution}"))
    class_weight = None
    if config.class_weights:
        class_weight = balanced_class_weights(distribution)
        emit(Message(f"Class weights: { {k: round(v, 2) for k, v in class_weight.items()} }"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said above as a Message
        model = build_classifier(len(names), config.image_size, weights, config.dropout,
                                 config.augment, config.augment_strength, fine_tune, config.seed)
    y = {s: np.asarray([r.label for r in getattr(samples, s)], dtype=np.int32)
         for s in ("train", "val", "test")}
    cached = config.cache and fine_tune == 0
    if cached:
        inputs = _features(config, samples, model, weights, emit, should_stop)
    else:
        inputs = _images(config, samples, emit, should_stop)
    if inputs is None:
        return stopped_result(names, {})

    # With cached features only the head is trained; it shares the classifier's layers.
    trained = build_head(model, inputs["train"].shape[-1]) if cached else model
    trained.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    autotune = tf.data.AUTOTUNE
    train_ds = (tf.data.Dataset.from_tensor_slices((inputs["train"], y["train"]))
                .shuffle(len(y["train"]), seed=config.seed, reshuffle_each_iteration=True))
    if cached:  # each epoch sees one of the cached views of every training image
        n_views = inputs["train"].shape[1]
        view_seed = tf.random.Generator.from_seed(config.seed)
        train_ds = train_ds.map(
            lambda f, label: (f[view_seed.uniform((), 0, n_views, tf.int32)], label))
    train_ds = train_ds.batch(config.batch_size).prefetch(autotune)
    has_val = len(y["val"]) > 0
    val_ds = (tf.data.Dataset.from_tensor_slices((inputs["val"], y["val"]))
              .batch(config.batch_size).prefetch(autotune)) if has_val else None
    steps = int(np.ceil(len(y["train"]) / config.batch_size))
    monitor = "val_loss" if has_val else "loss"
    history: dict = {}
    reporter = _make_callback(config.epochs, steps, emit, should_stop, history)
    callbacks = [reporter, keras.callbacks.ReduceLROnPlateau(
        monitor=monitor, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience,
        min_lr=config.min_lr, verbose=0)]
    if config.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=config.early_stopping_patience,
            restore_best_weights=True, verbose=0))
    trained.fit(train_ds, validation_data=val_ds, epochs=config.epochs, class_weight=class_weight,
              callbacks=callbacks, shuffle=False, verbose=0)  # tf.data shuffles
    if reporter.stopped:
        return stopped_result(names, history, reporter.epochs_run)
    if reporter.epochs_run < config.epochs:
        emit(Message(f"Early stopping after epoch {reporter.epochs_run}: the validation loss "
                     f"stopped improving; the best epoch's weights are kept."))

    report = None
    if len(y["test"]):
        emit(Progress("evaluating", 0, len(y["test"])))
        probs = trained.predict(inputs["test"], batch_size=config.batch_size, verbose=0)
        emit(Progress("evaluating", len(y["test"]), len(y["test"])))
        report = classification_report(y["test"], probs, names, samples.test)
    else:
        report = classification_report([], np.zeros((0, len(names))), names)
        emit(Message("No test images in the split: the test report is empty. Add images or "
                     "raise the test fraction.", "warning"))
    report["subset"] = "test"
    report["diagnosis"] = diagnose(history, report)

    meta = {
        "format": "microclf-bundle/1",
        "class_names": names,
        "input_size": [config.image_size, config.image_size, 3],
        "preprocessing": spec.to_dict(),
        "weights": weights or "none",
        "fine_tune": fine_tune,
        "cached_features": cached,
        "config": config.to_dict(),
        "history": history,
        "epochs_run": reporter.epochs_run,
        "class_distribution": {names[k]: v for k, v in distribution.items()},
        "class_weights": ({names[k]: v for k, v in class_weight.items()} if class_weight
                          else None),
        "split": {"file": str(Path(config.data_dir).resolve() / "split.json"),
                  **samples.split.to_dict()},
        "metrics": {k: report[k] for k in ("n", "accuracy", "per_class", "confusion_matrix")},
        "versions": versions(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "data_dir": str(Path(config.data_dir).resolve()),
    }
    bundle = write_bundle(config.out_dir, model, meta, report_files(report))
    if report["accuracy"] is not None:
        emit(Message(f"Test accuracy: {report['accuracy']:.4f} on {report['n']} images"))
    for f in report["diagnosis"]:
        emit(Message(f"{f['finding']}: {f['evidence'].rstrip('.')}. {f['remedy']}"))
    emit(Message(f"Model saved to {bundle}"))
    return TrainResult(bundle, names, history, report, False, reporter.epochs_run,
                       time.perf_counter() - t_start, meta)


def _images(config: TrainConfig, samples, emit, should_stop) -> dict | None:
    """Every page decoded and normalised once for the whole training."""
    spec = config.preprocessing
    total = len(samples.train) + len(samples.val) + len(samples.test)
    arrays, loaded, t0 = {}, 0, time.perf_counter()

    def loading(done, _n):
        n = loaded + done
        if n % 16 == 0 or n == total:
            rate = n / max(time.perf_counter() - t0, 1e-9)
            emit(Progress("loading", n, total, rate, (total - n) / rate))

    for subset in ("train", "val", "test"):
        refs = getattr(samples, subset)
        arrays[subset] = preprocess_refs(refs, spec, loading, should_stop)
        if arrays[subset] is None:
            return None
        loaded += len(refs)
    return arrays


def _features(config: TrainConfig, samples, model, weights, emit, should_stop) -> dict | None:
    """Backbone features from the dataset's cache, computing only what is missing."""
    from .features import FeatureCache, FeatureExtractor, cache_key, extract_features

    spec = config.preprocessing
    views = 1 + (config.views if config.augment else 0)
    strength = config.augment_strength if config.augment else None
    cache = FeatureCache(config.data_dir, cache_key(spec, weights, config.seed, strength))
    extractor = FeatureExtractor(model, config.seed, config.augment_strength, config.batch_size)
    plan = [("train", views), ("val", 1), ("test", 1)]
    earlier = {"done": 0, "last": 0}  # images of the subsets already finished

    def progress(done, total, seconds):
        rate = done / seconds if seconds > 0 else None
        earlier["last"] = total
        emit(Progress("features", earlier["done"] + done, earlier["done"] + total, rate,
                      (total - done) / rate if rate else None))

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
        emit(Message(f"Could not write the feature cache in {cache.folder} ({cache.unwritable})"
                     "; features will be computed again next time.", "warning"))
    emit(Message(f"Backbone features: {cache.computed} image(s) computed, {cache.hits} "
                 f"reused from the cache ({views} view(s) per training image) in "
                 f"{time.perf_counter() - t0:.1f}s"))
    return out
