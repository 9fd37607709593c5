"""Backbone throughput on inference engines: TensorFlow against ONNX Runtime and OpenVINO.

    python bench/engines.py [--backbone efficientnet-lite0|efficientnetb0|both] [--size 224]
        [--batch 32] [--images 128] [--rounds 5] [--threads N]

The EfficientNet backbone without top, with global average pooling (the 1280 features the
classifier's head sees, built by napari-microclf's own code), runs over the same real sample
images (written by napari_microclf.core.sample, preprocessed as for training) on: TF/Keras
``predict_on_batch`` (the reference), ONNX Runtime fp32 (tf2onnx), OpenVINO fp32 and bf16
(THROUGHPUT hint, async over the batches) and OpenVINO fp32 with the LATENCY hint
(synchronous). All engines are in this process and take turns: one pass each per round, so
a machine shared with others slows them alike. Prints best and median images/s, the ratio to
TensorFlow and the max abs difference of the features from TensorFlow's; then the batch-1
latency of TF, ONNX Runtime and OpenVINO fp32. EfficientNetB0's ImageNet weights cannot be
downloaded here, so B0 runs with random weights (same compute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine, sample_dataset

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    try:
        line = next(
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")
        )
    except (OSError, StopIteration):
        return "CPU flags unknown"
    have = set(line.split(":", 1)[1].split())
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in CPU_FLAGS)


def load_images(work: Path, n: int, size: int) -> np.ndarray:
    from napari_microclf.core.images import PreprocessSpec, preprocess, read_page

    data = sample_dataset(work, n_per_class=-(-n // 3))
    paths = sorted(data.glob("*/*.tif"))[:n]
    spec = PreprocessSpec(size)
    return np.stack([preprocess(read_page(p), spec) for p in paths]).astype(np.float32)


def build_backbone(name: str, size: int):
    from napari_microclf.core.features import make_backbone
    from napari_microclf.core.model import build_classifier

    weights = "auto" if name == "efficientnet-lite0" else None
    classifier = build_classifier(2, size, weights=weights, backbone=name, seed=0, warn=False)
    return make_backbone(classifier)


def batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    return [images[i : i + batch] for i in range(0, len(images), batch)]


def tf_engine(model):
    return lambda xs: np.concatenate([np.asarray(model.predict_on_batch(x)) for x in xs])


def ort_engine(fn, sig, threads: int):
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx
    from onnx import numpy_helper

    proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=17)
    # B0's Normalization mean/variance are captured constants that tf2onnx leaves as graph
    # inputs: make them initializers, so that the image is the only input
    captured = {
        inner.name: outer.numpy()
        for outer, inner in fn.get_concrete_function().graph.captures
        if outer.dtype != tf.resource
    }
    for graph_input in list(proto.graph.input):
        if graph_input.name in captured:
            value = captured[graph_input.name]
            proto.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
            proto.graph.input.remove(graph_input)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # not the notes on the constants it folds
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    (name,) = (i.name for i in session.get_inputs())
    return lambda xs: np.concatenate([session.run(None, {name: x})[0] for x in xs])


def ov_model(concrete):
    from napari_microclf.core.engine import import_openvino

    ov = import_openvino()

    converted = ov.convert_model(concrete)
    # the converted function also returns its variables etc.: keep the features only
    model = ov.Model(converted.outputs[:1], converted.get_parameters(), "backbone")
    shape = model.output(0).get_partial_shape()
    assert str(shape) == "[?,1280]", f"unexpected OpenVINO output shape {shape}"
    return model


def ov_compile(model, precision: str, hint: str, threads: int):
    from napari_microclf.core.engine import import_openvino

    ov = import_openvino()

    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": threads,
        },
    )
    return compiled, compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def ov_async_engine(compiled):
    from napari_microclf.core.engine import import_openvino

    ov = import_openvino()

    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    out: dict[int, np.ndarray] = {}
    queue.set_callback(
        lambda request, i: out.__setitem__(i, request.get_output_tensor(0).data.copy())
    )

    def run(xs):
        out.clear()
        for i, x in enumerate(xs):
            queue.start_async({0: x}, userdata=i)
        queue.wait_all()
        return np.concatenate([out[i] for i in range(len(xs))])

    return run


def ov_sync_engine(compiled):
    request = compiled.create_infer_request()
    return lambda xs: np.concatenate([request.infer({0: x})[0].copy() for x in xs])


def rounds(engines: dict, xs: list, n_rounds: int) -> dict[str, list[float]]:
    """Seconds per pass of each engine over ``xs``, the engines taking turns each round."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(n_rounds):
        for name, run in engines.items():
            t0 = time.perf_counter()
            run(xs)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_backbone(name: str, images: np.ndarray, args) -> None:
    import tensorflow as tf

    model = build_backbone(name, args.size)
    weights = (
        "ImageNet weights"
        if name == "efficientnet-lite0"
        else "random weights: no ImageNet download here"
    )
    print(
        f"\n## {name} ({weights}), {args.size} px, batch {args.batch}, {len(images)} images, "
        f"{args.rounds} rounds",
        flush=True,
    )
    sig = [tf.TensorSpec([None, args.size, args.size, 3], tf.float32)]
    fn = tf.function(lambda x: model(x, training=False), input_signature=sig)
    engines = {"TF/Keras predict_on_batch": tf_engine(model)}
    latency = {"TF/Keras": tf_engine(model)}
    notes = []
    try:
        engines["ONNX Runtime fp32"] = latency["ONNX Runtime"] = ort_engine(fn, sig, args.threads)
    except ImportError as exc:
        notes.append(f"ONNX Runtime skipped: {exc}")
    try:
        ovm = ov_model(fn.get_concrete_function())
        for precision in ("f32", "bf16"):
            compiled, got = ov_compile(ovm, precision, "THROUGHPUT", args.threads)
            label = f"OpenVINO {'fp32' if precision == 'f32' else 'bf16'} THROUGHPUT async"
            if got != precision:
                label += f" (runs {got}: no bf16 on this CPU)"
            engines[label] = ov_async_engine(compiled)
        compiled, _ = ov_compile(ovm, "f32", "LATENCY", args.threads)
        engines["OpenVINO fp32 LATENCY sync"] = latency["OpenVINO fp32"] = ov_sync_engine(compiled)
        from napari_microclf.core.engine import OpenVinoRunner, convert

        runner = OpenVinoRunner(convert(model))  # what microclf runs: each batch split
        engines["microclf's OpenVINO runner (fp32)"] = lambda xs: np.concatenate(
            [runner(x)[0] for x in xs]
        )
    except ImportError as exc:
        notes.append(f"OpenVINO skipped: {exc}")
    for note in notes:
        print(note)

    xs = batches(images, args.batch)
    features = {engine: run(xs) for engine, run in engines.items()}  # warm-up, outside timing
    reference = features["TF/Keras predict_on_batch"]
    times = rounds(engines, xs, args.rounds)
    tf_best = len(images) / min(times["TF/Keras predict_on_batch"])
    print("\n| engine | best images/s | median | vs TF | max abs diff of the features |")
    print("|---|---:|---:|---:|---:|")
    for engine, seconds in times.items():
        best, median = len(images) / min(seconds), len(images) / statistics.median(seconds)
        diff = float(np.max(np.abs(features[engine] - reference)))
        print(f"| {engine} | {best:.1f} | {median:.1f} | {best / tf_best:.2f}x | {diff:.2e} |")
    print(f"\n(TF's features: max |value| {float(np.max(np.abs(reference))):.2e})")

    singles = [images[i : i + 1] for i in range(min(len(images), args.latency_images))]
    for run in latency.values():
        run(singles[:2])  # warm-up of the batch-1 shape
    lat = rounds(latency, singles, args.rounds)
    print(f"\nBatch-1 latency ({len(singles)} single images per round):\n")
    print("| engine | best ms/image | median |")
    print("|---|---:|---:|")
    for engine, seconds in lat.items():
        ms = [1000 * s / len(singles) for s in seconds]
        print(f"| {engine} | {min(ms):.1f} | {statistics.median(ms):.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--backbone", default="both", choices=["efficientnet-lite0", "efficientnetb0", "both"]
    )
    p.add_argument("--size", type=int, default=224, help="model input side in pixels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="default: all cores")
    p.add_argument("--latency-images", type=int, default=16, help="batch-1 calls per round")
    p.add_argument("--work", default=None)
    args = p.parse_args()

    import tensorflow as tf

    from napari_microclf.core.engine import import_openvino

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    print(f"Machine: {machine()}; {cpu_flags()}; {args.threads} threads per engine")
    versions = []
    for module in ("onnxruntime", "tf2onnx", "openvino"):
        try:  # openvino through microclf's import, which keeps its usage reports off
            mod = import_openvino() if module == "openvino" else __import__(module)
            versions.append(f"{module} {mod.__version__}")
        except ImportError:
            versions.append(f"{module} not installed")
    print(", ".join(versions))

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    images = load_images(work, args.images, args.size)
    names = ["efficientnet-lite0", "efficientnetb0"] if args.backbone == "both" else [args.backbone]
    for name in names:
        bench_backbone(name, images, args)


if __name__ == "__main__":
    main()
