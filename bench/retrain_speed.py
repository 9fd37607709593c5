"""Retraining after adding 10 images to a 1,000-image dataset: ours against plain Keras.

    python bench/retrain_speed.py [--per-class 334] [--new 10] [--epochs 15]

Ours trains once (filling the feature cache), then 10 new images are added and ours
retrains: only the new images reach the backbone. The plain Keras pipeline retrains on the
same 1,010 images, same split, size and epochs. Ours runs once per engine (``--engines``:
the features and the test set on TensorFlow or OpenVINO), each on a fresh copy of the data.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import add_weights_argument, clear_cache, machine, resolve_weights, sample_dataset
from plain_keras import train_plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=334)
    p.add_argument("--new", type=int, default=10)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", default=None)
    p.add_argument("--engines", default="tensorflow,openvino", help="comma-separated engines")
    add_weights_argument(p)
    args = p.parse_args()

    import tifffile

    from napari_microclf.core.dataset import load_samples
    from napari_microclf.core.sample import CLASSES, make_image
    from napari_microclf.core.train import Message, TrainConfig, train

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    source = sample_dataset(work, args.per_class)
    print(f"Machine: {machine()}")
    rows = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        data = work / "retrain-data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(
            source, data, ignore=shutil.ignore_patterns(".microclf-cache", "split.json")
        )
        config = TrainConfig(
            str(data),
            str(work / f"retrain-model-{engine}"),
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            weights=resolve_weights(args.weights, work),
            early_stopping=False,
            engine=engine,
        )
        clear_cache(data)
        t0 = time.perf_counter()
        train(config)
        first = time.perf_counter() - t0
        n_before = sum(len(list((data / c).iterdir())) for c in CLASSES)
        print(
            f"{engine}: first training on {n_before} images (fills the cache): {first:.1f} s",
            flush=True,
        )

        rng = np.random.default_rng(123)
        for i in range(args.new):
            cls = CLASSES[i % len(CLASSES)]
            tifffile.imwrite(data / cls / f"new_{i:02d}.tif", make_image(cls, rng, 128))
        messages: list[str] = []
        t0 = time.perf_counter()
        result = train(
            config, lambda u, out=messages: out.append(u.text) if isinstance(u, Message) else 0
        )
        ours = time.perf_counter() - t0
        line = next(m for m in messages if m.startswith("Backbone features"))
        computed = int(re.search(r"(\d+) image", line).group(1))
        val = result.history["val_accuracy"][-1]
        rows[engine] = (first, ours, val, computed)
        print(
            f"{engine}: retrain after +{args.new} images: {ours:8.1f} s   val_accuracy "
            f"{val:.4f}   ({computed} images reached the backbone)",
            flush=True,
        )

    samples = load_samples(data, config.val_split, config.test_split, config.seed)
    plain = train_plain(samples, config)
    print(
        f"plain Keras retrain:               {plain['seconds']:8.1f} s   val_accuracy "
        f"{plain['val_accuracy']:.4f}"
    )
    print()
    print("| | engine | first training | retrain | validation accuracy | vs plain Keras |")
    print("|---|---|---|---|---|---|")
    print(
        f"| plain Keras retrain | tensorflow | | {plain['seconds']:.1f} s | "
        f"{plain['val_accuracy']:.3f} | 1.0x |"
    )
    for engine, (first, ours, val, _computed) in rows.items():
        print(
            f"| napari-microclf retrain | {engine} | {first:.1f} s | {ours:.1f} s | {val:.3f} | "
            f"{plain['seconds'] / ours:.1f}x faster |"
        )


if __name__ == "__main__":
    main()
