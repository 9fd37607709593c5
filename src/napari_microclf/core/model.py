"""The classifier: EfficientNetB0 without its top, plus a small trained head; model bundles.

The model takes float pixels in [0, 255] (EfficientNet normalises inside). Layers, in order:
``augmentation`` (active only in training), ``efficientnetb0`` (the base), ``avg_pool``,
``dropout`` and ``predictions`` (softmax). A *bundle* is a folder with ``model.keras`` and
``microclf.json`` (class order, preprocessing, config, history, split, metrics, versions).
TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from .images import PreprocessSpec

MODEL_FILE = "model.keras"
META_FILE = "microclf.json"
IMAGENET_FILE = "efficientnetb0_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/keras-applications/" + IMAGENET_FILE
N_STAGES = 7  # EfficientNetB0 stages block1..block7


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had; the message says how to get them."""


class BundleError(ValueError):
    """A model bundle that is missing, corrupt or does not match; says what to do."""


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()


def imagenet_cached() -> bool:
    """Whether the EfficientNetB0 ImageNet weights are already in the Keras cache."""
    return (keras_home() / "models" / IMAGENET_FILE).is_file()


def normalize_weights(weights) -> str | None:
    """``"imagenet"``, a file path, or ``None`` (from None, "none" or "")."""
    if weights is None or str(weights).strip().lower() in ("", "none", "null", "random"):
        return None
    w = str(weights)
    if w.lower() == "imagenet":
        return "imagenet"
    if not Path(w).expanduser().is_file():
        raise WeightsError(
            f"weights file {w} does not exist; give an EfficientNetB0 (no top) .h5 weights "
            "file, 'imagenet' or 'none'"
        )
    return str(Path(w).expanduser().resolve())


def _build_base(image_size: int, weights: str | None):
    import keras

    shape = (image_size, image_size, 3)
    try:
        return keras.applications.EfficientNetB0(include_top=False, weights=weights,
                                                 input_shape=shape)
    except Exception as exc:
        if weights == "imagenet":
            cached = keras_home() / "models" / IMAGENET_FILE
            raise WeightsError(
                "Could not get the ImageNet weights for EfficientNetB0 "
                f"({type(exc).__name__}: {str(exc)[:200]}). Without network access, download "
                f"{IMAGENET_FILE} from {IMAGENET_URL} on another machine and place it at "
                f"{cached} (the Keras cache; set KERAS_HOME to move it), or choose a weights "
                "file (--weights PATH), or train without pretrained weights (--weights none "
                "--fine-tune all)."
            ) from exc
        if weights is not None:
            raise WeightsError(
                f"weights file {weights} does not fit EfficientNetB0 without top "
                f"({type(exc).__name__}: {str(exc)[:200]}); use {IMAGENET_FILE} or 'none'"
            ) from exc
        raise


def build_augmentation(strength: float = 0.05, seed: int | None = None):
    """Flips (both ways: a microscope has no "up"), rotation, zoom and contrast of ±strength."""
    import keras

    layers = [keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)]
    if strength > 0:
        layers += [
            keras.layers.RandomRotation(strength, fill_mode="reflect", seed=seed),
            keras.layers.RandomZoom(strength, fill_mode="reflect", seed=seed),
            keras.layers.RandomContrast(strength, seed=seed),
        ]
    return keras.Sequential(layers, name="augmentation")


def parse_fine_tune(value) -> int:
    """0 (frozen base), 1..7 (top stages unfrozen) or ``"all"`` -> 7 + top (returned as -1)."""
    if value in (None, False, "", "0", 0, "none"):
        return 0
    if isinstance(value, str) and value.strip().lower() == "all":
        return -1
    n = int(value)
    if n < 0 or n > N_STAGES:
        if n == -1:
            return -1
        raise ValueError(f"fine_tune must be 0..{N_STAGES} or 'all', got {value!r}")
    return n


def build_classifier(
    n_classes: int,
    image_size: int = 224,
    weights: str | None = "imagenet",
    dropout: float = 0.2,
    augment: bool = True,
    augment_strength: float = 0.05,
    fine_tune=0,
    seed: int | None = None,
):
    """Build (uncompiled) the classifier; the base is frozen unless ``fine_tune`` says."""
    import keras

    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    weights = normalize_weights(weights)
    fine_tune = parse_fine_tune(fine_tune)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    base = _build_base(image_size, weights)
    from_scratch = weights is None and fine_tune == -1
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = build_augmentation(augment_strength, seed)(inputs) if augment else inputs
    # A pretrained base runs in inference mode (BatchNorm statistics kept) even when parts
    # of it are unfrozen; a base trained from scratch must learn its BatchNorm statistics.
    x = base(x) if from_scratch else base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout", seed=seed)(x)
    outputs = keras.layers.Dense(
        n_classes, activation="softmax", name="predictions",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    model = keras.Model(inputs, outputs, name="microclf")
    set_fine_tune(model, fine_tune, keep_batchnorm_frozen=not from_scratch)
    if from_scratch:
        # BatchNorm's moving statistics (momentum 0.99) need thousands of steps to settle;
        # a small dataset gives a few hundred, and validation would then run on statistics
        # that are still near their initial values. 0.9 settles within ~50 steps.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    if weights is None and fine_tune == 0:
        warnings.warn(FROZEN_RANDOM_WARNING, stacklevel=2)
    return model


FROZEN_RANDOM_WARNING = (
    "The EfficientNetB0 base is frozen and has no pretrained weights: only the head trains, on "
    "random features, so the model will barely learn. Use ImageNet weights (--weights "
    "imagenet) or train the whole network (--fine-tune all)."
)


def set_fine_tune(model, fine_tune, keep_batchnorm_frozen: bool = True) -> None:
    """Freeze the base, then unfreeze its top ``fine_tune`` stages (-1: all of it).

    BatchNorm layers stay frozen unless ``keep_batchnorm_frozen`` is False. The frozen
    stages also lose their stochastic depth (the ``*_drop`` layers): Keras 3 passes
    ``fit``'s ``training=True`` into a nested model even when it was called with
    ``training=False``, so those layers would drop whole residual branches of a frozen,
    pretrained base during training (features up to 10^5 away from the inference ones)
    while inference never does. Frozen stages thus give the same features in training and
    inference, as a feature extractor should; unfrozen stages keep it. Recompile after.
    """
    import keras

    n = parse_fine_tune(fine_tune)
    base = model.get_layer("efficientnetb0")
    first_open = N_STAGES + 1 if n == 0 else 1 if n == -1 else N_STAGES - n + 1
    base.trainable = n != 0
    for layer in base.layers:
        name = layer.name
        if name.startswith("block"):
            unfrozen = int(name[5]) >= first_open
        else:  # stem_* belongs with block1; top_* with block7
            unfrozen = n == -1 or (n != 0 and name.startswith("top"))
        if isinstance(layer, keras.layers.Dropout):
            if not hasattr(layer, "_microclf_rate"):
                layer._microclf_rate = layer.rate
            layer.rate = layer._microclf_rate if unfrozen else 0.0
        if n == 0:
            continue  # base.trainable = False already freezes every layer
        if keep_batchnorm_frozen and isinstance(layer, keras.layers.BatchNormalization):
            unfrozen = False
        layer.trainable = unfrozen


def build_head(model, n_features: int):
    """A model from pooled backbone features to class probabilities that *shares* the
    classifier's ``dropout`` and ``predictions`` layers: training it trains the classifier."""
    import keras

    features = keras.Input((n_features,), name="features")
    x = model.get_layer("dropout")(features)
    return keras.Model(features, model.get_layer("predictions")(x), name="head")


# -- bundles -------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    model: object
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocessing"])


def write_bundle(out: str | Path, model, meta: dict, extra_files: dict[str, str] | None = None
                 ) -> Path:
    """Write a bundle to a temporary folder beside ``out``, then swap it into place.

    An existing bundle at ``out`` is replaced only once the new one is complete. A folder at
    ``out`` that is not a bundle is never touched: a BundleError says to choose another.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out / META_FILE).exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not a microclf model folder; choose another "
                          "output folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save(tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(path: str | Path) -> dict:
    """Read and check ``microclf.json`` of a bundle folder."""
    path = Path(path).expanduser()
    if path.is_file() and path.name in (MODEL_FILE, META_FILE):
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"model folder {path} does not exist; train a model first or pick the "
                          f"folder that holds {MODEL_FILE} and {META_FILE}")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise BundleError(f"{path} has no {META_FILE}: not a microclf model folder (train one "
                          "with microclf or pick another folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise BundleError(f"{meta_path} is corrupt ({exc}); retrain or restore the model") from exc
    problems = []
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        problems.append("class_names must list at least 2 class names")
    try:
        PreprocessSpec.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"preprocessing is missing or invalid ({exc})")
    if problems:
        raise BundleError(f"{meta_path}: " + "; ".join(problems) + " (retrain the model)")
    return meta


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle with Keras' safe mode and check that model and metadata agree."""
    import keras

    meta = read_meta(path)
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    model_path = folder / MODEL_FILE
    if not model_path.exists():
        raise BundleError(f"{folder} has no {MODEL_FILE}; retrain the model")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:
        raise BundleError(f"{model_path} cannot be loaded ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); retrain the model") from exc
    n_out = int(model.output_shape[-1])
    if n_out != len(meta["class_names"]):
        raise BundleError(
            f"{model_path} predicts {n_out} classes but {META_FILE} lists "
            f"{len(meta['class_names'])} ({meta['class_names']}); the files do not belong "
            "together: retrain or restore the model folder"
        )
    size = PreprocessSpec.from_dict(meta["preprocessing"]).image_size
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise BundleError(f"{model_path} takes input {model.input_shape[1:]} but {META_FILE} "
                          f"says {size}x{size}x3; retrain or restore the model folder")
    return Bundle(folder.resolve(), model, meta)


def versions() -> dict:
    import keras
    import tensorflow as tf

    from .. import __version__

    return {"napari_microclf": __version__, "tensorflow": tf.__version__,
            "keras": keras.__version__}
