"""Prediction speed on a stack: napari-microclf's streaming Predictor against the raw model.

    python bench/predict_speed.py [--pages 500] [--size 256] [--image-size 224]

"raw" is the TensorFlow classifier alone on pages already decoded, normalised and resized,
in batches; "ours" reads the TIFF page by page, preprocesses and classifies (what a user
runs), once per engine (``--engines``: TensorFlow, OpenVINO fp32, OpenVINO bf16), each
against the raw TensorFlow model. Also prints the peak of Python/NumPy memory during each
prediction against the stack's size, and with ``--xla`` whether XLA compilation
(jit_compile) makes the raw forward pass faster here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=500)
    p.add_argument("--size", type=int, default=256, help="page side in pixels")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", default=None)
    p.add_argument(
        "--engines",
        default="tensorflow,openvino,openvino-bf16",
        help="comma-separated: tensorflow, openvino (fp32), openvino-bf16",
    )
    p.add_argument("--xla", action="store_true", help="also time the raw model with XLA")
    args = p.parse_args()

    import tensorflow as tf
    import tifffile

    from napari_microclf.core.bundle import write_bundle
    from napari_microclf.core.images import PreprocessSpec, open_image, preprocess
    from napari_microclf.core.model import build_classifier
    from napari_microclf.core.predictor import Predictor
    from napari_microclf.core.sample import make_sample_stack

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    stack_path = work / f"stack-{args.pages}x{args.size}.tif"
    if not stack_path.exists():
        stack, _ = make_sample_stack(args.pages, args.size, seed=5)
        tifffile.imwrite(stack_path, stack, photometric="minisblack")
    spec = PreprocessSpec(args.image_size)
    model = build_classifier(3, args.image_size, None, fine_tune="all", augment=False)
    bundle = write_bundle(
        work / "predict-model",
        model,
        {"class_names": ["a", "b", "c"], "preprocessing": spec.to_dict()},
    )
    model = Predictor(bundle, batch_size=args.batch_size, engine="tensorflow").bundle.model
    print(f"Machine: {machine()}")
    print(
        f"Stack: {args.pages} pages of {args.size}x{args.size} uint16 "
        f"({stack_path.stat().st_size / 1e6:.0f} MB), model input {args.image_size} px, "
        f"batch {args.batch_size}"
    )

    with open_image(stack_path) as f:  # decoded outside any timing
        pages = np.stack([preprocess(f.page(i), spec) for i in range(len(f))])
    sig = [tf.TensorSpec([None, args.image_size, args.image_size, 3], tf.float32)]

    def raw_rate(pages, jit: bool) -> float:
        fn = tf.function(lambda x: model(x, training=False), input_signature=sig, jit_compile=jit)
        fn(pages[: args.batch_size])  # compile both batch shapes outside the timing
        fn(
            pages[len(pages) - len(pages) % args.batch_size :]
            if len(pages) % args.batch_size
            else pages[: args.batch_size]
        )
        t0 = time.perf_counter()
        for i in range(0, len(pages), args.batch_size):
            np.asarray(fn(pages[i : i + args.batch_size]))
        return len(pages) / (time.perf_counter() - t0)

    raw = raw_rate(pages, False)
    print(f"raw TensorFlow model:          {raw:7.1f} images/s", flush=True)
    if args.xla:
        try:
            xla = raw_rate(pages, True)
            print(f"raw model with XLA:  {xla:7.1f} images/s  ({xla / raw:.2f}x)", flush=True)
        except Exception as exc:  # noqa: BLE001 - XLA not available for this build/device
            print(f"raw model with XLA:  not available ({type(exc).__name__})")
    del pages

    stack_mb = args.pages * args.size * args.size * 2 / 1e6
    batch_mb = args.batch_size * args.image_size**2 * 3 * 4 / 1e6
    rows = []
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        engine, _, precision = name.partition("-")
        predictor = Predictor(
            bundle, batch_size=args.batch_size, engine=engine, precision=precision or "f32"
        )
        list(predictor.predict_file(stack_path))  # warm-up (tracing, compiling), same file
        t0 = time.perf_counter()
        n = sum(1 for _ in predictor.predict_file(stack_path))
        seconds = time.perf_counter() - t0
        tracemalloc.start()  # a separate pass: tracing allocations slows NumPy down
        sum(1 for _ in predictor.predict_file(stack_path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append((name, n / seconds, peak / 1e6))
        print(
            f"ours, {name}: {n / seconds:7.1f} images/s ({n / seconds / raw:.2f}x raw)", flush=True
        )
    print()
    print("| engine | from the file, images/s | vs the raw TensorFlow model | peak memory |")
    print("|---|---|---|---|")
    print(f"| raw TensorFlow model (pages in memory) | {raw:.1f} | 1.00x | |")
    for name, rate, peak in rows:
        print(f"| napari-microclf, {name} | {rate:.1f} | {rate / raw:.2f}x | {peak:.1f} MB |")
    print(f"\n(stack {stack_mb:.0f} MB, one input batch {batch_mb:.1f} MB)")


if __name__ == "__main__":
    main()
