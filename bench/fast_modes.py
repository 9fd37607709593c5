"""The fast prediction modes against fp32: speed and top-1 agreement, on two image sets.

    python bench/fast_modes.py [--image-size 224] [--precisions bf16,int8] [--sets sample,digits]

For each image set a model is trained the default way (frozen Lite0 with its ImageNet
weights, cached features, on OpenVINO), then every page of the set is classified at fp32
and at each fast precision (``--precisions``) from the files, as a user runs it:

- **sample**: the synthetic sample data (``--per-class`` images per class, 3 classes);
- **digits**: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes; installed
  with scikit-learn, which NNCF brings), written as 16-bit TIFFs into class folders.

Prints, per set and precision: images/s from the files, the speed against fp32 in the same
run, the share of pages whose top class equals fp32's, the largest probability difference,
and the test-set accuracy of each. bf16 needs a CPU with bf16 instructions; elsewhere
OpenVINO runs it at fp32 and the row says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine, sample_dataset


def digits_dataset(root: Path) -> Path:
    """scikit-learn's digits (0-16 gray levels, 8x8) as uint16 TIFFs in class folders."""
    import tifffile
    from sklearn.datasets import load_digits

    data = root / "digits"
    if data.is_dir():
        return data
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = data / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        big = np.kron(image, np.ones((4, 4))).astype(np.uint16) * 1000  # 32 px, 16-bit
        tifffile.imwrite(folder / f"d{i:04d}.tif", big)
    return data


def run_set(name: str, data: Path, work: Path, args) -> list[str]:
    from napari_microclf.core.dataset import load_samples
    from napari_microclf.core.engine import cpu_has_bf16
    from napari_microclf.core.images import find_images
    from napari_microclf.core.predictor import Predictor
    from napari_microclf.core.train import TrainConfig, train

    out = work / f"model-{name}"
    config = TrainConfig(
        str(data),
        str(out),
        image_size=args.image_size,
        backbone="efficientnet-lite0",
        weights="auto",
        epochs=args.epochs,
        engine="openvino",
    )
    t0 = time.perf_counter()
    train(config)
    print(f"{name}: trained in {time.perf_counter() - t0:.1f} s", flush=True)
    files = find_images([data])
    samples = load_samples(data, config.val_split, config.test_split, config.seed)
    test = {str(r.path) for r in samples.test}
    truth = {str(r.path): samples.class_names[r.label] for r in samples.test}
    results = {}
    for precision in ["f32", *args.precisions]:
        predictor = Predictor(out, engine="openvino", precision=precision)
        list(predictor.predict_paths(files[:64]))  # warm-up: compile, quantize (int8) once
        t0 = time.perf_counter()
        rows = list(predictor.predict_paths(files))
        rate = len(rows) / (time.perf_counter() - t0)
        results[precision] = (rows, rate)
        print(f"{name} {precision}: {rate:.1f} images/s", flush=True)
    ref, ref_rate = results["f32"]
    lines = []
    for precision, (rows, rate) in results.items():
        agree = np.mean([a.class_name == b.class_name for a, b in zip(ref, rows, strict=True)])
        diff = max(
            abs(a.probabilities[k] - b.probabilities[k])
            for a, b in zip(ref, rows, strict=True)
            for k in a.probabilities
        )
        scored = [r for r in rows if r.file in test]
        acc = np.mean([truth[r.file] == r.class_name for r in scored]) if scored else float("nan")
        label = precision
        if precision == "bf16" and not cpu_has_bf16():
            label = "bf16 (runs f32: no bf16 on this CPU)"
        lines.append(
            f"| {name} ({len(rows)} images) | {label} | {rate:.1f} | {rate / ref_rate:.2f}x | "
            f"{agree:.1%} | {diff:.3f} | {acc:.3f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--per-class", type=int, default=150, help="sample data: images per class")
    p.add_argument("--precisions", default="bf16,int8")
    p.add_argument("--sets", default="sample,digits")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    print(f"Machine: {machine()}")
    lines = []
    for name in [x.strip() for x in args.sets.split(",") if x.strip()]:
        data = sample_dataset(work, args.per_class) if name == "sample" else digits_dataset(work)
        lines += run_set(name, data, work, args)
    print()
    print(
        "| images | precision | images/s | vs fp32 | top-1 agreement with fp32 | "
        "largest probability difference | test accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
