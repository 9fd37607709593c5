"""Export a model bundle for use outside microclf.

Four formats (:data:`FORMATS`), each written atomically (a temporary sibling, then renamed):

- ``bioimageio``: a bioimage.io model package (spec 0.5, a ``.zip``) for bioimage.io tools
  (bioimageio.core, and the tools built on it). Its ``keras_v3`` weights take the image at
  any size, float RGB as microclf arranges channels; the package's preprocessing is the
  bundle's percentile normalisation (``scale_range`` per image and channel, then
  ``scale_linear`` x255 and ``clip`` to [0, 255], the range the model takes), and the model
  resizes to its own input size inside (a Keras ``Resizing`` layer, padded to a square when
  the bundle pads). Output: the class probabilities (axes batch, channel; one channel per
  class, named by the class names). Test input and output come from a real page (the first of
  the bundle's test list when its dataset is still there, else a page given as ``example``).
- ``savedmodel``: a TensorFlow SavedModel (``tf.saved_model.load(path).serve(x)``).
- ``onnx``: an ONNX file (ONNX Runtime). Needs ``tf2onnx``: ``pip install
  "napari-microclf[onnx]"``.
- ``zip``: the microclf bundle itself as one ``.zip`` (:func:`~.bundle.zip_bundle`), which
  microclf opens as it opens the folder.

SavedModel and ONNX take the model's own input: ``(batch, S, S, 3)`` float32 pixels in
[0, 255] after microclf's preprocessing (:func:`~.images.preprocess` with the bundle's
:class:`~.images.PreprocessSpec`), and give ``(batch, n_classes)`` probabilities in the
bundle's class order. All of them are inference-only graphs (no augmentation, no dropout).
TensorFlow, Keras, bioimageio.spec and tf2onnx are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from .bundle import load_bundle, own_split, zip_bundle
from .errors import BundleError, ExportError, OutputError
from .files import refuse_destroying
from .images import dtype_range, preprocess, read_page, select_channels
from .model import base_layer
from .objects import model_crop_spec

FORMATS = ("bioimageio", "savedmodel", "onnx", "zip")
FORMAT_HELP = {
    "bioimageio": "bioimage.io model package (.zip): bioimageio.core and bioimage.io tools",
    "savedmodel": "TensorFlow SavedModel (folder): TensorFlow Serving, tf.saved_model.load",
    "onnx": "ONNX (.onnx): ONNX Runtime and other ONNX tools",
    "zip": "the microclf model folder as one .zip, to share with microclf users",
}
ONNX_INSTALL = 'pip install "napari-microclf[onnx]"'
BIOIMAGEIO_INSTALL = 'pip install "napari-microclf[export]"'
CITATION = (
    "napari-microclf: classify microscopy images in napari (annotate, train an "
    "EfficientNet transfer-learning classifier, predict)."
)
CITATION_URL = "https://pypi.org/project/napari-microclf/"
LICENSE = "BSD-3-Clause"
ONNX_OPSET = 17


def check_format(fmt: str) -> str:
    f = str(fmt).strip().lower().replace("-", "").replace("_", "")
    f = {"bioimage": "bioimageio", "tf": "savedmodel", "tfsavedmodel": "savedmodel"}.get(f, f)
    if f not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return f


def default_out(bundle_path: str | Path, fmt: str) -> Path:
    """Where an export goes by default: next to the model folder, named after it."""
    fmt = check_format(fmt)
    p = Path(bundle_path).expanduser().resolve()
    if p.is_file() and p.suffix.lower() != ".zip":  # model.keras or microclf.json
        p = p.parent
    name = p.stem if p.is_file() else p.name
    suffix = {
        "bioimageio": "-bioimageio.zip",
        "savedmodel": "-savedmodel",
        "onnx": ".onnx",
        "zip": ".zip",
    }[fmt]
    return p.parent / (name + suffix)


def check_destination(
    out: str | Path, fmt: str, overwrite: bool = False, bundle_path: str | Path | None = None
) -> Path:
    """Refuse a destination that exists (unless ``overwrite``, and then only an earlier
    export of the same format), that would destroy the model, the working directory or a
    folder above it (:func:`~.files.refuse_destroying`), or whose folder is missing, before
    any work is done."""
    refuse_destroying(
        out, protected=[bundle_path] if bundle_path else (), what="export destination"
    )
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputError(
            f"{out} exists; choose another destination (--out) or replace it (--overwrite)"
        )
    if out.exists() and not _earlier_export(out, fmt):
        raise OutputError(
            f"{out} exists and is not an earlier {fmt} export; --overwrite replaces only "
            "what an export wrote: choose another destination"
        )
    if out.exists() and fmt != "savedmodel" and out.is_dir():
        raise OutputError(
            f"{out} is a folder; give the file to write (e.g. {out / default_out(out, fmt).name})"
        )
    if not out.parent.is_dir():
        raise OutputError(
            f"cannot write {out}: the folder {out.parent} does not exist; "
            "create it or choose another destination"
        )
    return out


def _earlier_export(out: Path, fmt: str) -> bool:
    """Whether ``out`` looks like what an export of ``fmt`` writes (so --overwrite may
    replace it): a SavedModel folder, a zip file, an ONNX file."""
    if fmt == "savedmodel":
        return out.is_dir() and (out / "saved_model.pb").is_file()
    if out.is_dir():
        return True  # said below: give a file name
    if fmt == "onnx":
        return out.suffix.lower() == ".onnx"
    return zipfile.is_zipfile(out)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote, and what it measured."""

    path: Path
    format: str
    seconds: float
    size_bytes: int
    max_abs_diff: float | None = None  # export vs. the bundle on the test tensor


def export(
    bundle_path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    example: str | Path | None = None,
    authors: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the model bundle at ``bundle_path`` in format ``fmt``; returns the path written.

    Parameters
    ----------
    bundle_path : path
        The model folder (or a zipped bundle for the formats other than ``zip``).
    fmt : {"bioimageio", "savedmodel", "onnx", "zip"}
        See the module's documentation.
    out : path, optional
        Default: :func:`default_out` (next to the model folder).
    example : path, optional
        bioimageio: the image whose first page becomes the package's test input. Default:
        the first page of the bundle's own test list when its dataset is still there.
    authors : list of str, optional
        bioimageio: the package's authors (default: the user's login name).
    overwrite : bool
        Replace an existing ``out``.

    Examples
    --------
    >>> export("model", "bioimageio")  # doctest: +SKIP
    PosixPath('.../model-bioimageio.zip')
    """
    return export_model(
        bundle_path, fmt, out, example=example, authors=authors, overwrite=overwrite
    ).path


def export_model(
    bundle_path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    example: str | Path | None = None,
    authors: list[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """:func:`export`, returning an :class:`ExportResult` (path, time, size, check)."""
    fmt = check_format(fmt)
    out = check_destination(
        out if out is not None else default_out(bundle_path, fmt), fmt, overwrite, bundle_path
    )
    t0 = time.perf_counter()
    diff = None
    if fmt == "zip":
        with _atomic(out, overwrite) as tmp:
            zip_bundle(bundle_path, tmp)
    elif fmt == "savedmodel":
        diff = _export_savedmodel(bundle_path, out, overwrite)
    elif fmt == "onnx":
        diff = _export_onnx(bundle_path, out, overwrite)
    else:
        diff = _export_bioimageio(bundle_path, out, overwrite, example, authors)
    return ExportResult(out, fmt, time.perf_counter() - t0, _size(out), diff)


# -- writing atomically ---------------------------------------------------------------------


class _atomic:
    """``with _atomic(out, overwrite) as tmp:`` write ``tmp`` (file or folder); on success it
    replaces ``out`` (an existing one only when ``overwrite``), else it is removed."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            _remove(self.tmp)
            return False
        if not self.tmp.exists():
            raise OutputError(f"the export wrote nothing to {self.tmp}")
        old = None
        if self.out.exists():
            if not self.overwrite:
                _remove(self.tmp)
                raise OutputError(
                    f"{self.out} appeared while exporting; choose another "
                    "destination or replace it (--overwrite)"
                )
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            _remove(old)
        return False


def _remove(p: Path) -> None:
    """Remove what the export wrote (or replaced); a symbolic link is removed, never followed."""
    if p.is_symlink():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


# -- the inference model ----------------------------------------------------------------------


def inference_model(model, resize: str | None = None):
    """The classifier's inference path as its own Keras model: base (``training=False``),
    pooling and the softmax layer; no augmentation, no dropout. Layers (and weights) are
    shared with ``model``.

    ``resize`` ``"pad"`` or ``"stretch"``: the model takes images of any size and resizes
    them to its input size inside (bilinear, antialiased; ``"pad"`` pads to a square with
    black first, as microclf does).
    """
    import keras

    size = int(model.input_shape[1])
    if resize is None:
        inputs = keras.Input((size, size, 3), name="image")
        x = inputs
    else:
        inputs = keras.Input((None, None, 3), name="image")
        x = keras.layers.Resizing(
            size,
            size,
            interpolation="bilinear",
            antialias=True,
            pad_to_aspect_ratio=resize == "pad",
            name="resize",
        )(inputs)
    try:
        base = base_layer(model)
        pool, head = model.get_layer("avg_pool"), model.get_layer("predictions")
    except (BundleError, ValueError):
        outputs = model(x, training=False)  # another layout: the whole model, in inference
    else:
        outputs = head(pool(base(x, training=False)))
    return keras.Model(inputs, outputs, name="microclf_export")


def _constant_normalization(model) -> None:
    """Make the mean and variance of every Keras ``Normalization`` layer in ``model`` (the
    EfficientNet's input normalisation) numpy arrays, so a traced graph holds them as
    constants: as tensors they are captured and tf2onnx leaves them as graph inputs."""
    import keras

    def walk(layer):
        yield layer
        for sub in getattr(layer, "layers", []) or []:
            yield from walk(sub)

    for layer in walk(model):
        if isinstance(layer, keras.layers.Normalization) and layer.mean is not None:
            for name in ("mean", "variance"):
                value = keras.ops.convert_to_numpy(getattr(layer, name))
                object.__setattr__(layer, name, value)


def _check_tensor(bundle):
    """A deterministic batch of 3 model inputs in [0, 255] to compare an export with."""
    s = bundle.preprocess.image_size
    return np.random.default_rng(0).uniform(0, 255, (3, s, s, 3)).astype(np.float32)


def model_name(bundle) -> str:
    """The model's name for people: its folder's, or its zip's (not the cache folder's)."""
    source = getattr(bundle, "source", None)  # the .zip a zipped bundle was opened from
    return Path(source).stem if source else bundle.path.name


def _load(bundle_path):
    return load_bundle(bundle_path)


# -- SavedModel ----------------------------------------------------------------------------


def _export_savedmodel(bundle_path, out: Path, overwrite: bool) -> float:
    import tensorflow as tf

    bundle = _load(bundle_path)
    model = inference_model(bundle.model)
    x = _check_tensor(bundle)
    expected = np.asarray(bundle.model(x, training=False))
    with _atomic(out, overwrite) as tmp:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        _write_json(tmp / "microclf.json", _sidecar(bundle))
        loaded = tf.saved_model.load(str(tmp))  # kept: its variables die with it
        got = loaded.serve(tf.constant(x)).numpy()
        del loaded
        diff = float(np.abs(got - expected).max())
        _check_diff(diff, 1e-4, "SavedModel")
    return diff


# -- ONNX ---------------------------------------------------------------------------------


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tf2onnx", "onnx"))


def _export_onnx(bundle_path, out: Path, overwrite: bool) -> float | None:
    if not onnx_available():
        raise ExportError(
            f"ONNX export needs tf2onnx and onnx, which are not installed: "
            f"{ONNX_INSTALL} (nothing was written)"
        )
    import onnx

    bundle = _load(bundle_path)
    x = _check_tensor(bundle)
    expected = np.asarray(bundle.model(x, training=False))
    model = inference_model(bundle.model)
    _constant_normalization(model)
    model(x[:1], training=False)  # Keras exports only a model that has been called
    with _atomic(out, overwrite) as tmp:
        tmp_onnx = tmp.with_name(tmp.name + ".onnx")  # Keras wants the suffix
        try:
            with warnings.catch_warnings():  # Keras' tf2onnx patch probes np.object
                warnings.filterwarnings("ignore", category=FutureWarning, module="keras")
                model.export(str(tmp_onnx), format="onnx", verbose=False, opset_version=ONNX_OPSET)
            graph = onnx.load(str(tmp_onnx))
            initializers = {i.name for i in graph.graph.initializer}
            inputs = [i.name for i in graph.graph.input if i.name not in initializers]
            if inputs != ["image"]:
                raise ExportError(
                    f"the ONNX graph takes {inputs}, not only the image; this "
                    "model cannot be exported to ONNX yet (use --format "
                    "savedmodel or bioimageio)"
                )
            # what the graph is: the class order and preprocessing travel inside it
            for key, value in (
                ("microclf", json.dumps(_sidecar(bundle))),
                ("class_names", json.dumps(bundle.class_names)),
            ):
                entry = graph.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(graph, str(tmp))
        finally:
            _remove(tmp_onnx)
        diff = None
        try:
            import onnxruntime as ort
        except ImportError:
            pass  # checked where ONNX Runtime is installed
        else:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": x})[0]
            diff = float(np.abs(got - expected).max())
            _check_diff(diff, 1e-4, "ONNX")
    return diff


def _check_diff(diff: float, tol: float, what: str) -> None:
    if not diff <= tol:
        raise ExportError(
            f"the {what} export's probabilities differ from the model's by "
            f"{diff:.2g} (more than {tol:g}); nothing was written; please "
            "report this as a bug"
        )


def _sidecar(bundle) -> dict:
    """The facts a user of an exported model needs: class order and preprocessing."""
    return {
        "class_names": bundle.class_names,
        "preprocessing": bundle.preprocess.to_dict(),
        "input": "float32 (batch, S, S, 3) pixels in [0, 255] after microclf's "
        "preprocessing (napari_microclf.core.images.preprocess)",
        "output": "float32 (batch, n_classes) probabilities in class_names order",
        "source": {k: bundle.meta.get(k) for k in ("date", "backbone", "versions")},
    }


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


# -- bioimage.io ----------------------------------------------------------------------------


def example_page(bundle, example: str | Path | None = None) -> tuple[np.ndarray, str]:
    """A real page for the package's test tensors and where it comes from: ``example``'s
    first page, else the first of the bundle's own test (then validation, training) list
    whose file is still in the dataset."""
    if example is not None:
        return read_page(example), Path(example).name
    data_dir = bundle.meta.get("data_dir")
    split = own_split(bundle.path) or {}
    if data_dir:
        for subset in ("test", "val", "train"):
            for entry in split.get(subset, []):
                p = Path(data_dir) / entry["key"]
                if p.is_file():
                    return read_page(p), f"{entry['key']} (the model's {subset} list)"
    raise ExportError(
        f"no example image for the package's test tensors: the dataset of "
        f"{model_name(bundle)} is not there; give one (--example IMAGE)"
    )


def bioimageio_preprocess(x: np.ndarray, spec) -> np.ndarray:
    """What the package's preprocessing does to a ``(batch, y, x, channel)`` tensor, as
    bioimageio.core computes it (percentiles per image and channel)."""
    x = x.astype(np.float32)
    if spec.intensity == "percentile":
        lo = np.percentile(x, spec.pmin, axis=(1, 2), keepdims=True)
        hi = np.percentile(x, spec.pmax, axis=(1, 2), keepdims=True)
        x = (x - lo) / (hi - lo + 1e-6) * 255.0
    else:
        lo, hi = spec.intensity_range
        x = (x - lo) * (255.0 / (hi - lo))
    return np.clip(x, 0.0, 255.0).astype(np.float32)


def _fixed_range(spec, page: np.ndarray) -> tuple[float, float]:
    return (
        tuple(spec.intensity_range) if spec.intensity_range is not None else dtype_range(page.dtype)
    )


def _export_bioimageio(bundle_path, out: Path, overwrite: bool, example, authors) -> float:
    try:
        from bioimageio.spec import save_bioimageio_package  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"bioimage.io export needs bioimageio.spec, which is not installed: "
            f"{BIOIMAGEIO_INSTALL} (nothing was written)"
        ) from exc
    import dataclasses

    import keras

    bundle = _load(bundle_path)
    page, source = example_page(bundle, example)
    # "auto" decided by the example's dtype: the package declares one fixed preprocessing
    spec = bundle.preprocess.resolved(page.dtype)
    if spec.intensity == "fixed":
        spec = dataclasses.replace(spec, intensity_range=_fixed_range(spec, page))
    rgb = select_channels(page if page.ndim == 3 else page[..., None], spec.channel_map)
    test_input = rgb.astype(np.float32)[None]
    model = inference_model(bundle.model, resize=spec.resize_mode)
    test_output = np.asarray(model(bioimageio_preprocess(test_input, spec), training=False))
    # the bundle's own prediction of the same page (microclf's preprocessing and resize)
    own = np.asarray(bundle.model(preprocess(page, spec)[None], training=False))
    diff = float(np.abs(test_output - own).max())
    with tempfile.TemporaryDirectory(prefix="microclf-bioimageio-") as work:
        work = Path(work)
        model.save(work / "weights.keras")
        np.save(work / "test_input.npy", test_input)
        np.save(work / "test_output.npy", test_output)
        _sample_png(work / "sample_input.png", preprocess(page, spec))
        import tifffile

        tifffile.imwrite(work / "sample_output.tif", test_output.astype(np.float32))
        _cover(work / "cover.png", preprocess(page, spec), test_output[0], bundle.class_names)
        (work / "README.md").write_text(
            _readme(bundle, spec, source, diff, test_input.shape), encoding="utf-8"
        )
        _write_json(work / "microclf.json", bundle.meta)
        descr = _describe(bundle, spec, work, authors, keras)
        with _atomic(out, overwrite) as tmp:
            _save_package(descr, tmp)
    return diff


def _save_package(descr, tmp: Path) -> None:
    from bioimageio.spec import ValidationContext, save_bioimageio_package

    written = tmp.with_name(tmp.name + ".zip")  # the package's writer wants a .zip name
    try:
        with ValidationContext(perform_io_checks=False):
            save_bioimageio_package(descr, output_path=written)
        os.replace(written, tmp)
    finally:
        _remove(written)


def _describe(bundle, spec, work: Path, authors, keras):
    import getpass

    import tensorflow as tf
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as bio

    names = bundle.class_names
    channel_names = _channel_names(spec)
    if spec.intensity == "percentile":
        steps = [
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
            bio.ScaleRangeDescr(
                kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId("y"), bio.AxisId("x")],
                    min_percentile=float(spec.pmin),
                    max_percentile=float(spec.pmax),
                    eps=1e-6,
                )
            ),
            bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=255.0, offset=0.0)),
        ]
    else:
        lo, hi = spec.intensity_range
        steps = [
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
            bio.ScaleLinearDescr(
                kwargs=bio.ScaleLinearKwargs(gain=255.0 / (hi - lo), offset=-lo * 255.0 / (hi - lo))
            ),
        ]
    steps.append(bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=255.0)))
    who = [bio.Author(name=a) for a in (authors or [getpass.getuser() or "unknown"])]
    with ValidationContext(root=work, perform_io_checks=False):
        inputs = bio.InputTensorDescr(
            id=bio.TensorId("image"),
            description=f"{' / '.join(channel_names)} image, any size (resized to "
            f"{spec.image_size} px inside the model)"[:128],
            axes=[
                bio.BatchAxis(),
                bio.SpaceInputAxis(id=bio.AxisId("y"), size=bio.ParameterizedSize(min=8, step=1)),
                bio.SpaceInputAxis(id=bio.AxisId("x"), size=bio.ParameterizedSize(min=8, step=1)),
                bio.ChannelAxis(channel_names=channel_names),
            ],
            test_tensor=bio.FileDescr(source=work / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_input.png"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=steps,
        )
        outputs = bio.OutputTensorDescr(
            id=bio.TensorId("probabilities"),
            description="class probabilities (softmax), one channel per class",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=list(names))],
            test_tensor=bio.FileDescr(source=work / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_output.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )
        weights = bio.WeightsDescr(
            keras_v3=bio.KerasV3WeightsDescr(
                source=work / "weights.keras",
                keras_version=keras.__version__,
                backend=("tensorflow", tf.__version__),
                comment=f"{bundle.meta.get('backbone', 'efficientnet-b0')} classifier trained "
                f"with napari-microclf; resize built in",
            )
        )
        acc = (bundle.meta.get("metrics") or {}).get("accuracy")
        acc_text = f", test accuracy {acc:.1%}" if isinstance(acc, (int, float)) else ""
        descr = bio.ModelDescr(
            name=f"microclf {model_name(bundle)}"[:128],
            description=(
                f"Image classifier of {len(names)} classes ({', '.join(names)}) "
                f"trained with napari-microclf{acc_text}."
            )[:1024],
            authors=who,
            cite=[bio.CiteEntry(text=CITATION, url=CITATION_URL)],
            license=LICENSE,
            documentation=bio.FileDescr(source=work / "README.md"),
            covers=[bio.FileDescr(source=work / "cover.png")],
            attachments=[bio.FileDescr(source=work / "microclf.json")],
            tags=["classification", "2d", "napari-microclf", "keras", "efficientnet"],
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
            version="0.1.0",
            config=bio.Config(
                bioimageio=bio.BioimageioConfig(),
                **{
                    "napari_microclf": {
                        "version": __version__,
                        "class_names": names,
                        "preprocessing": spec.to_dict(),
                    }
                },
            ),
        )
    return descr


def _channel_names(spec) -> list[str]:
    cm = spec.channel_map
    if cm is None:
        return ["r", "g", "b"]
    return [f"ch{c}" if c is not None else f"empty{i}" for i, c in enumerate(cm)]


def _cover(path: Path, image: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    """A 2:1 PNG: the test page as the model sees it, and its class probabilities."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.05, 0.44, 0.88))
    ax.imshow(np.clip(image / 255.0, 0, 1), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("test image", fontsize=9)
    bx = fig.add_axes((0.62, 0.15, 0.34, 0.75))
    y = np.arange(len(names))
    bx.barh(y, probs, color="#4a90d9")
    bx.set_yticks(y, [str(n)[:14] for n in names], fontsize=8)
    bx.set_xlim(0, 1)
    bx.invert_yaxis()
    bx.set_title(f"predicted: {names[int(np.argmax(probs))]}", fontsize=9)
    bx.tick_params(axis="x", labelsize=7)
    fig.savefig(path, format="png")


def _sample_png(path: Path, image: np.ndarray) -> None:
    """The test page as the model sees it (8-bit RGB), for people browsing the package."""
    import imageio.v3 as iio

    iio.imwrite(path, np.clip(image, 0, 255).astype(np.uint8))


def _objects_note(crop) -> list[str]:
    """A model of objects: what its input image is (the crop around one object)."""
    return [
        "This model classifies **objects**: its input is the square crop around one object "
        f"(one label of a segmentation) of the image: {crop.describe()} (masked pixels are "
        "0), zero-padded beyond the image's border. Cut the crops so (napari-microclf does: "
        "`microclf predict MODEL IMAGE --labels LABELS`) and classify each.",
        "",
    ]


def _readme(bundle, spec, source: str, diff: float, shape) -> str:
    names = bundle.class_names
    report = bundle.path / "report.md"
    pre = (
        f"per image and channel, the {spec.pmin:g} and {spec.pmax:g} percentiles are mapped "
        "to 0 and 1 (`scale_range`), then multiplied by 255 (`scale_linear`) and clipped to "
        "[0, 255] (`clip`)"
        if spec.intensity == "percentile"
        else f"the intensities {spec.intensity_range[0]:g}..{spec.intensity_range[1]:g} are "
        "mapped to 0..255 (`scale_linear`) and clipped (`clip`)"
    )
    lines = [
        f"# microclf model: {model_name(bundle)}",
        "",
        f"An image classifier trained with [napari-microclf]({CITATION_URL}), exported as a "
        "bioimage.io model package.",
        "",
        "## Input",
        "",
        "One 2D image, axes `batch, y, x, channel`, 3 channels "
        f"({', '.join(_channel_names(spec))}), float32, any size: the model resizes it to "
        f"{spec.image_size} x {spec.image_size} inside ("
        + (
            "padded to a square with black, then resized"
            if spec.resize_mode == "pad"
            else "each side resized"
        )
        + ", bilinear with antialiasing).",
        "",
        "Channels as microclf arranges them: "
        + (
            "a gray image repeated three times, a 2-channel image as (ch0, ch1, black), the "
            "first three channels otherwise."
            if spec.channel_map is None
            else f"source channels {list(spec.channel_map)} as R, G, B (None: black)."
        ),
        "",
        f"Preprocessing (in the package): {pre}. The model itself takes pixels in [0, 255].",
        "",
        *(_objects_note(crop) if (crop := model_crop_spec(bundle.meta)) else []),
        "## Output",
        "",
        "`probabilities`, axes `batch, channel`: one softmax probability per class, in this "
        "order: " + ", ".join(f"`{n}`" for n in names) + ".",
        "",
        "## Test tensors",
        "",
        f"`test_input.npy` {tuple(shape)} is {source}; `test_output.npy` is this package's "
        "output for it. microclf's own prediction of that page (its preprocessing and "
        f"resize) differs from it by at most {diff:.2g}.",
        "",
        "## Validation",
        "",
        "The model was validated by napari-microclf's training on the held-out test list of its "
        "dataset (see the training report below). At export, this package's output for the "
        f"test input was checked against microclf's own prediction (largest difference "
        f"{diff:.2g}).",
        "",
        "## Differences from microclf",
        "",
        "- microclf resizes with scikit-image (Gaussian antialiasing), the package with "
        "Keras' `Resizing` layer: probabilities of images larger than the input size may "
        "differ slightly.",
        "- Where the two percentiles of a channel coincide (a small object on an empty "
        "background) microclf uses the channel's minimum and maximum instead; `scale_range` "
        "cannot say so.",
        "",
        "## License and citation",
        "",
        f"{LICENSE}. Cite: {CITATION} {CITATION_URL}",
        "",
    ]
    text = "\n".join(lines)
    if report.is_file():
        text += "\n## Training report\n\n" + _demote(report.read_text(encoding="utf-8"))
    return text


def _demote(markdown: str) -> str:
    """The report's headings one level down, under the README's own."""
    return (
        "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())
        + "\n"
    )
