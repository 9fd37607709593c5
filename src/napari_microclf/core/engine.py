"""Inference engines: OpenVINO on the CPU where it is installed, TensorFlow otherwise.

Training (the head and fine-tuning) always runs on TensorFlow. What only runs a model
forward, the backbone features of the feature cache, the test-set evaluation and every
prediction, runs on the engine chosen by ``engine``:

- ``"auto"`` (default): OpenVINO when the ``openvino`` package imports, else TensorFlow;
- ``"openvino"``: OpenVINO, or an :class:`EngineError` saying how to install it;
- ``"tensorflow"``: TensorFlow / Keras, as before OpenVINO existed here.

OpenVINO runs at fp32 (``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 support it would
otherwise pick bf16 by itself), so its features and probabilities equal TensorFlow's within
1e-4 (tested). ``precision="bf16"`` (CPUs with bf16 instructions) and ``"int8"`` (NNCF,
calibrated on the model's training images) are opt-in fast modes for prediction only: they
change probabilities, and docs/performance.md gives how often the class changes.

A Keras model is converted through a traced ``tf.function`` (``openvino.convert_model`` of
its concrete function), keeping only the outputs asked for. A conversion takes seconds, so
converted models are kept: a bundle trained with OpenVINO installed carries its own
(:data:`IR_XML`/:data:`IR_BIN`, so it predicts without TensorFlow on any computer), and other
models are cached in ``$KERAS_HOME/microclf-openvino/`` keyed by their weights' content.
This module imports neither TensorFlow nor OpenVINO at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import settings
from .bundle import model_sha256
from .device import stderr_muted
from .errors import MicroclfError
from .model import FEATURE_LAYER
from .settings import keras_home

ENGINES = ("auto", "openvino", "tensorflow")
PRECISIONS = ("f32", "bf16", "int8")
INT8_CALIBRATION = 128  # training pages that calibrate an int8 model (fewer if it has fewer)
IR_XML, IR_BIN = "model-openvino.xml", "model-openvino.bin"  # a bundle's converted model
CACHE_DIR = "microclf-openvino"  # under keras_home(): converted models, by key
CONVERSION_VERSION = 1  # bump when the conversion changes what a cached model computes


class EngineError(MicroclfError, ValueError):
    """An engine or precision that cannot be used here; says what to do."""


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a module hidden by setting sys.modules[...] = None
        return False


def check_engine(engine: str | None) -> str:
    """``engine`` (None: ``auto``) checked: one of :data:`ENGINES`."""
    name = str(engine or "auto").strip().lower()
    if name not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    return name


def resolve_engine(engine: str | None = "auto") -> str:
    """The engine that will run: ``"openvino"`` or ``"tensorflow"``. ``auto`` is
    ``$MICROCLF_ENGINE`` where set, else OpenVINO when installed, else TensorFlow."""
    name = check_engine(engine)
    if name == "auto" and (chosen := settings.engine()):
        name = check_engine(chosen)
    if name == "auto":
        return "openvino" if openvino_available() else "tensorflow"
    if name == "openvino" and not openvino_available():
        raise EngineError(
            "the OpenVINO engine needs the openvino package: pip install openvino "
            "(or use --engine tensorflow)"
        )
    return name


def check_precision(precision: str | None, engine: str) -> str:
    """``precision`` checked for the resolved ``engine``: TensorFlow runs fp32 only."""
    p = (precision or "f32").strip().lower().replace("fp", "f")
    if p not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}: use f32, bf16 or int8")
    if p != "f32" and engine != "openvino":
        raise EngineError(
            f"precision {p} needs the OpenVINO engine (pip install openvino, --engine openvino)"
        )
    if p == "int8" and importlib.util.find_spec("nncf") is None:
        raise EngineError(
            "precision int8 needs NNCF to quantize the model: pip install nncf (or "
            "napari-microclf[int8])"
        )
    return p


def engine_label(engine: str, precision: str = "f32") -> str:
    """``"openvino 2026.4.1 f32"`` or ``"tensorflow 2.21.0"``: what computed a result."""
    if engine == "openvino":
        ov = import_openvino()

        return f"openvino {ov.__version__.split('-')[0]} {precision}"
    import tensorflow as tf

    return f"tensorflow {tf.__version__}"


# -- conversion ---------------------------------------------------------------------------


def convert(model, outputs: Sequence[str] = ()) -> object:
    """A Keras ``model`` as an ``openvino.Model`` with its output and the named layers'
    outputs, in that order, run in inference mode (augmentation layers pass through).

    The traced function's extra outputs (variables the trace exposes) are dropped: they would
    be computed on every call.
    """
    import keras

    ov = import_openvino()
    import tensorflow as tf

    if outputs:
        model = keras.Model(
            model.input, [model.output, *(model.get_layer(n).output for n in outputs)]
        )
    n_out = 1 + len(outputs)
    size = tuple(model.input_shape[1:])
    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, *size], tf.float32)],
    )
    with stderr_muted():
        traced = ov.convert_model(fn.get_concrete_function())
    kept = ov.Model(list(traced.outputs[:n_out]), traced.get_parameters(), "microclf")
    for i, out in enumerate(kept.outputs):
        out.get_tensor().set_names({f"output_{i}"})
    kept.get_parameters()[0].output(0).get_tensor().set_names({"image"})
    return kept


def _import_quietly(name: str):
    """Import ``name`` with OpenVINO's usage-reporting package hidden (see
    :func:`import_openvino`)."""
    import importlib
    import sys

    if name not in sys.modules:
        hidden = sys.modules.get("openvino_telemetry", ...)
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
        try:
            importlib.import_module(name)
        finally:
            if hidden is ...:
                del sys.modules["openvino_telemetry"]
            else:
                sys.modules["openvino_telemetry"] = hidden
    return sys.modules[name]


def import_openvino():
    """``import openvino``, without its usage reports.

    OpenVINO's package reports its import and each conversion to Google Analytics unless the
    user opted out with its ``opt_in_out`` tool; microclf sends nothing anywhere, so the
    reporting package is hidden while OpenVINO is first imported (OpenVINO then uses its own
    do-nothing stand-in, as where that package is not installed).
    """
    openvino = _import_quietly("openvino")
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

    convert_impl.tm = telemetry_utils.tm = telemetry_stub  # imported before: silenced now
    return openvino


def save_ir(ov_model, xml: Path) -> None:
    """Write ``ov_model`` as ``xml`` and its ``.bin`` beside it, both or neither (atomic)."""
    ov = import_openvino()

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ir-", dir=xml.parent))
    try:
        ov.save_model(ov_model, tmp / "m.xml", compress_to_fp16=False)
        os.replace(tmp / "m.bin", xml.with_suffix(".bin"))
        os.replace(tmp / "m.xml", xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ir_bytes(ov_model) -> tuple[bytes, bytes]:
    """``(xml, bin)`` of ``ov_model``: what a bundle stores as :data:`IR_XML`/:data:`IR_BIN`."""
    ov = import_openvino()

    with tempfile.TemporaryDirectory() as d:
        ov.save_model(ov_model, Path(d) / "m.xml", compress_to_fp16=False)
        return (Path(d) / "m.xml").read_bytes(), (Path(d) / "m.bin").read_bytes()


def cache_root() -> Path:
    return keras_home() / CACHE_DIR


def cache_key(**fields) -> str:
    """A cache folder name for a converted model: what it was converted from and by whom."""
    ov = import_openvino()

    fields = {**fields, "openvino": ov.__version__, "conversion": CONVERSION_VERSION}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


_CACHE_LOCK = threading.Lock()
CACHE_MAX_ENTRIES = 16  # converted models kept (least recently used dropped): ~15 MB each


def prune_ir_cache(root: Path, keep: str, max_entries: int = CACHE_MAX_ENTRIES) -> None:
    """Drop the least recently used converted models beyond ``max_entries`` (never ``keep``)."""
    try:
        entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in [p for p in entries if p.name != keep][max(max_entries - 1, 0) :]:
        shutil.rmtree(old, ignore_errors=True)


def cached_ir(key: str, build: Callable[[], object]) -> object:
    """The converted model cached under ``key``, or ``build()`` it (and cache it).

    An unreadable cached copy is converted again; a cache that cannot be written is said
    with a warning (the model is still returned).
    """
    ov = import_openvino()

    xml = cache_root() / key / "model.xml"
    with _CACHE_LOCK:
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                ov_model = ov.Core().read_model(xml)
                with contextlib.suppress(OSError):
                    os.utime(xml.parent)  # recently used: pruned last
                return ov_model
            except RuntimeError:
                pass  # torn or from another OpenVINO: convert again
        ov_model = build()
        try:
            save_ir(ov_model, xml)
            prune_ir_cache(xml.parent.parent, keep=key)
        except OSError as exc:
            warnings.warn(
                f"could not keep the converted model in {xml.parent} ({exc}); it will be "
                "converted again next time",
                stacklevel=2,
            )
        return ov_model


# -- running ------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (AVX-512 BF16 or AMX)."""
    ov = import_openvino()
    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


class OpenVinoRunner:
    """A compiled OpenVINO model run on numpy batches: ``runner(x)`` -> list of outputs.

    A batch is split across the CPU's parallel streams (the THROUGHPUT hint) and its parts
    run at once on asynchronous requests; a small batch runs in one request.
    """

    def __init__(self, ov_model, precision: str = "f32"):
        ov = import_openvino()
        import openvino.properties as props

        core = ov.Core()
        if precision == "bf16" and not cpu_has_bf16():
            warnings.warn(
                "this CPU has no bf16 instructions: OpenVINO runs the model at f32 (the "
                "same numbers as precision f32, and its speed)",
                stacklevel=3,
            )
            precision = "f32"
        self.precision = precision  # what runs (int8: the quantized model's own ops)
        self.compiled = core.compile_model(
            ov_model,
            "CPU",
            {
                props.hint.inference_precision: ov.Type.bf16
                if precision == "bf16"
                else ov.Type.f32,
                props.hint.performance_mode: props.hint.PerformanceMode.THROUGHPUT,
            },
        )
        self.n_outputs = len(self.compiled.outputs)
        self.n_requests = max(
            int(self.compiled.get_property(props.optimal_number_of_infer_requests)), 1
        )
        self._requests = [self.compiled.create_infer_request() for _ in range(self.n_requests)]
        self._lock = threading.Lock()  # requests are not shared between threads at once

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        if n == 0:
            shapes = [o.get_partial_shape() for o in self.compiled.outputs]
            return [
                np.zeros((0, *(int(d.get_length()) for d in s[1:])), np.float32) for s in shapes
            ]
        parts = min(self.n_requests, max(n // 4, 1))  # at least 4 images a request
        bounds = np.linspace(0, n, parts + 1).astype(int)
        with self._lock:
            used = self._requests[:parts]
            for req, a, b in zip(used, bounds[:-1], bounds[1:], strict=True):
                req.start_async({0: x[a:b]}, share_inputs=False)
            for req in used:
                req.wait()
            return [
                np.concatenate([req.get_output_tensor(i).data.copy() for req in used])
                for i in range(self.n_outputs)
            ]


def bundle_ir(
    folder: str | Path, meta: dict, load_model: Callable[[], object], outputs=()
) -> object:
    """The ``openvino.Model`` of a bundle: its own :data:`IR_XML` when it was made from this
    very ``model.keras`` (its SHA-256 recorded in ``microclf.json`` as ``model_sha256``),
    else a cached conversion keyed by ``model.keras``'s SHA-256 (``load_model()`` gives the
    Keras model when it must be converted). So a replaced ``model.keras`` is never shadowed
    by the OpenVINO copy of the one before: predict, Grad-CAM and export use the same model."""
    ov = import_openvino()
    folder = Path(folder)
    sha = model_sha256(folder)
    own = meta.get("openvino") if isinstance(meta.get("openvino"), dict) else None
    if own and meta.get("model_sha256") == sha and list(own.get("outputs", [])) == list(outputs):
        xml = folder / own.get("xml", IR_XML)
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                return ov.Core().read_model(xml)
            except RuntimeError:
                pass  # written by a newer OpenVINO: convert below
    key = cache_key(kind="bundle", model_sha256=sha, outputs=list(outputs))
    return cached_ir(key, lambda: convert(load_model(), outputs))


def quantize_int8(ov_model, images: Sequence[np.ndarray]):
    """``ov_model`` quantized to int8 by NNCF (weights and activations, the MIXED preset),
    its activation ranges calibrated on ``images`` (model input, one page each)."""
    import_openvino()
    nncf = _import_quietly("nncf")
    data = nncf.Dataset([np.asarray(x, np.float32)[None] for x in images])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(
            ov_model,
            data,
            subset_size=len(images),
            preset=nncf.QuantizationPreset.MIXED,
            fast_bias_correction=True,
        )


def backbone_ir(backbone, weights_id: str | None, image_size: int):
    """The converted backbone (a Keras model ending in the pooled features): cached by its
    weights' identity and size where ``weights_id`` is given, so it is converted once."""

    def build():
        return convert(backbone)

    if weights_id is None:
        return build()
    return cached_ir(cache_key(kind="backbone", weights=weights_id, size=image_size), build)


def with_head(backbone_model, kernel: np.ndarray, bias: np.ndarray):
    """A converted frozen backbone with a softmax Dense head on its pooled features: outputs
    ``[probabilities, features]``, what :func:`convert` makes of the whole classifier, in
    milliseconds instead of a conversion's seconds (the frozen base is unchanged)."""
    ov = import_openvino()
    import openvino.opset13 as ops

    base = backbone_model.clone()
    feats = base.get_results()[0].input_value(0)  # what the backbone's result node returns
    logits = ops.add(
        ops.matmul(feats, ops.constant(np.asarray(kernel, np.float32)), False, False),
        ops.constant(np.asarray(bias, np.float32)),
    )
    probs = ops.softmax(logits, 1)
    model = ov.Model([probs.output(0), feats], base.get_parameters(), "microclf")
    for i, out in enumerate(model.outputs):
        out.get_tensor().set_names({f"output_{i}"})
    return model


def classifier_forward(model, engine: str, precision: str = "f32", frozen_base=None):
    """``x`` -> ``[probabilities, pooled features]`` of a Keras classifier, run by ``engine``
    (``"openvino"``: converted now, in memory; ``"tensorflow"``: a traced function). Also
    returns the converted ``openvino.Model`` (None for TensorFlow), for a bundle to keep.
    ``frozen_base``: the converted backbone, when ``model``'s base is that frozen backbone
    (only its head was trained): the head is added to it instead of converting again."""
    if engine == "openvino":
        if frozen_base is not None:
            kernel, bias = model.get_layer("predictions").get_weights()
            ov_model = with_head(frozen_base, kernel, bias)
        else:
            ov_model = convert(model, (FEATURE_LAYER,))
        return OpenVinoRunner(ov_model, precision), ov_model
    import keras
    import tensorflow as tf

    both = keras.Model(model.input, [model.output, model.get_layer(FEATURE_LAYER).output])
    size = tuple(model.input_shape[1:])
    fn = tf.function(
        lambda x: both(x, training=False),
        reduce_retracing=True,
        input_signature=[tf.TensorSpec([None, *size], tf.float32)],
    )
    return (lambda x: [np.asarray(a) for a in fn(np.asarray(x, np.float32))]), None
