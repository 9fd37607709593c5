"""Training speed: napari-microclf (cached features) against the plain Keras pipeline.

    python bench/train_speed.py [DATA] [--epochs 15] [--image-size 224] [--views 4]

Without DATA it makes the sample data (``--per-class`` images in each of 3 classes, by
default 860, which gives about 1,800 training images). Both run on the same split, image
size, batch size and epochs, with early stopping off so both run every epoch. The feature
cache is cleared first, so "ours" is the full end-to-end time of a first training, once per
engine (``--engines``): the backbone's features and the test set on TensorFlow or on
OpenVINO (the conversion of the backbone, cached for later trainings, is cleared too and
counted). The floor is TensorFlow's backbone alone running once over every image view ours
uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    add_weights_argument,
    clear_cache,
    machine,
    resolve_weights,
    sample_dataset,
    time_backbone,
)
from plain_keras import train_plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="?", help="dataset folder (default: the sample data)")
    p.add_argument("--per-class", type=int, default=860)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--views", type=int, default=None, help="augmented views (default: ours)")
    p.add_argument("--skip-plain", action="store_true", help="only ours and the floor")
    p.add_argument("--work", default=None, help="folder for data and models (default: temp)")
    p.add_argument("--engines", default="tensorflow,openvino", help="comma-separated engines")
    add_weights_argument(p)
    args = p.parse_args()

    from napari_microclf.core.dataset import load_samples
    from napari_microclf.core.train import TrainConfig, train

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    data = Path(args.data) if args.data else sample_dataset(work, args.per_class)
    extra = {"views": args.views} if args.views is not None else {}
    config = TrainConfig(
        str(data),
        str(work / "model"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        weights=resolve_weights(args.weights, work),
        early_stopping=False,
        **extra,
    )
    samples = load_samples(data, config.val_split, config.test_split, config.seed)
    n_train, n_val, n_test = len(samples.train), len(samples.val), len(samples.test)
    views = 1 + config.views
    print(f"Machine: {machine()}")
    print(
        f"Data: {data} - {n_train} train / {n_val} val / {n_test} test images; "
        f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
        f"{config.views} augmented views, weights {args.weights}"
    )

    ours = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        clear_cache(data)
        forget_conversion(config)
        t0 = time.perf_counter()
        result = train(dataclasses.replace(config, engine=engine))
        ours[engine] = (time.perf_counter() - t0, result.history["val_accuracy"][-1])
        print(
            f"ours, {engine}: {ours[engine][0]:8.1f} s   val_accuracy {ours[engine][1]:.4f}",
            flush=True,
        )

    n_views = n_train * views + n_val + n_test
    floor = time_backbone(n_views, args.image_size, config.weights, args.batch_size)
    print(f"floor: {floor:8.1f} s   (backbone alone over {n_views} image views)", flush=True)

    plain = None
    if not args.skip_plain:
        plain = train_plain(samples, config)
        print(
            f"plain: {plain['seconds']:8.1f} s   val_accuracy {plain['val_accuracy']:.4f}   "
            f"({plain['seconds'] / args.epochs:.1f} s/epoch)"
        )
    print()
    print("| | engine | wall time | validation accuracy | vs plain Keras | vs the floor |")
    print("|---|---|---|---|---|---|")
    if plain:
        print(
            f"| plain Keras pipeline | tensorflow | {plain['seconds']:.1f} s | "
            f"{plain['val_accuracy']:.3f} | 1.00x | |"
        )
    for engine, (seconds, val) in ours.items():
        speed = f"{plain['seconds'] / seconds:.2f}x faster" if plain else ""
        print(
            f"| napari-microclf | {engine} | {seconds:.1f} s | {val:.3f} | {speed} | "
            f"{seconds / floor:.2f}x |"
        )
    print(
        f"| floor (TensorFlow backbone only, {n_views} views) | tensorflow | {floor:.1f} s | | | |"
    )


def forget_conversion(config) -> None:
    """Remove the cached OpenVINO conversion of this training's backbone (a first training)."""
    import shutil

    from napari_microclf.core.engine import cache_key, cache_root, openvino_available
    from napari_microclf.core.model import resolve_weights, weights_identity

    if not openvino_available():
        return
    resolved = resolve_weights(config.backbone, config.weights)
    wid = weights_identity(resolved.backbone, resolved.weights, config.seed)
    key = cache_key(kind="backbone", weights=wid, size=config.image_size)
    shutil.rmtree(cache_root() / key, ignore_errors=True)


if __name__ == "__main__":
    main()
