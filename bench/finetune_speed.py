"""Fine-tuning's second phase: the open stages on cached activations against a plain Keras
fine-tune of the same network on the images, in the same run.

    python bench/finetune_speed.py                  # Lite0, top 2 stages, 224 px, 256 images
    python bench/finetune_speed.py --stages 3 --images 128

Plain Keras: the classifier (augmentation layers, the base with its top stages unfrozen, the
head) fit on the images, every epoch running the whole network. microclf: the frozen stages
run once for each image and each of its 8 views (core/finetune.py), then the open stages and
the head fit on those activations. Both at batch 64 with AdamW; each side's first epoch
(tracing) is not timed. Prints images/s of an epoch, the ratio, and the time of a 30-epoch
phase 2 on 2,100 training images (the MRI set's) from those rates. ``--bf16`` also times the
open stages under Keras' ``mixed_bfloat16`` policy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def _classifier(stages: int, size: int, augment: bool):
    from napari_microclf.core.model import LITE0, build_classifier, set_fine_tune

    model = build_classifier(4, size, "imagenet", 0.2, augment, 0.1, 0, 0, LITE0, warn=False)
    set_fine_tune(model, stages)
    return model


def _fit_rate(model, x, y, epochs: int) -> float:
    """Images per second of ``epochs`` epochs after one untimed (tracing) epoch."""
    import keras

    model.compile(keras.optimizers.AdamW(1e-4), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return epochs * len(x) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)
    import keras

    from napari_microclf.core.finetune import make_views, split_classifier

    print(f"# fine-tuning speed on {machine()}", flush=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.images, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 4, args.images)

    plain = _fit_rate(_classifier(args.stages, args.size, True), x, y, args.epochs)

    model = _classifier(args.stages, args.size, False)
    lower, top = split_classifier(model, args.stages)
    view = make_views(0.1, 0)
    t0 = time.perf_counter()
    acts = np.concatenate(
        [
            np.asarray(lower(view(x[i : i + 32], k), training=False)).astype(np.float16)
            for k in range(args.views)
            for i in range(0, len(x), 32)
        ]
    )
    cache_rate = len(acts) / (time.perf_counter() - t0)
    ours = _fit_rate(top, acts.astype("float32"), np.tile(y, args.views), args.epochs)
    n, epochs = 2100, 30
    plain_min = n * epochs / plain / 60
    ours_min = (n * args.views / cache_rate + n * epochs / ours) / 60
    print(
        f"Lite0, top {args.stages} stages, {args.size} px, batch 64:\n"
        f"  plain Keras, whole network on the images: {plain:.1f} images/s per epoch\n"
        f"  microclf, open stages on cached activations: {ours:.1f} images/s per epoch "
        f"({ours / plain:.1f}x), after the frozen stages at {cache_rate:.1f} images/s once per "
        f"view ({tuple(acts.shape[1:])} float16, {acts[0].nbytes / 1024:.0f} kB per view)\n"
        f"  {epochs} epochs on {n} images, {args.views} views: plain {plain_min:.1f} min, "
        f"microclf {ours_min:.1f} min ({plain_min / ours_min:.1f}x)",
        flush=True,
    )
    if args.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        _, top16 = split_classifier(_classifier(args.stages, args.size, False), args.stages)
        bf16 = _fit_rate(top16, acts.astype("float32"), np.tile(y, args.views), args.epochs)
        keras.mixed_precision.set_global_policy("float32")
        print(f"  open stages under mixed_bfloat16: {bf16:.1f} images/s ({bf16 / ours:.2f}x fp32)")


if __name__ == "__main__":
    main()
