"""How many augmented views per training image? Time and accuracy of cached training by K.

    python bench/views_sweep.py [--per-class 300] [--views 0 1 2 4 8]

Each K trains from an empty cache (end-to-end time) and reports the validation and test
accuracy; the default K of napari-microclf was chosen from this table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import add_weights_argument, clear_cache, machine, resolve_weights, sample_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--views", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seeds", type=int, default=2, help="training seeds averaged per K")
    p.add_argument("--work", default=None)
    add_weights_argument(p)
    args = p.parse_args()

    from napari_microclf.core.train import TrainConfig, train

    work = Path(args.work or tempfile.mkdtemp(prefix="microclf-bench-"))
    data = sample_dataset(work, args.per_class, seed=11)
    weights = resolve_weights(args.weights, work)
    print(f"Machine: {machine()}")
    print(f"{'K':>3} {'seconds':>8} {'val_acc':>8} {'test_acc':>8}")
    for k in args.views:
        rows = []
        for seed in range(args.seeds):
            clear_cache(data)
            config = TrainConfig(
                str(data),
                str(work / "sweep-model"),
                epochs=args.epochs,
                image_size=args.image_size,
                weights=weights,
                views=k,
                augment=True,
                early_stopping=False,
                seed=seed,
            )
            t0 = time.perf_counter()
            result = train(config)
            rows.append(
                (
                    time.perf_counter() - t0,
                    result.history["val_accuracy"][-1],
                    result.report["accuracy"],
                )
            )
        s, v, t = (sum(c) / len(rows) for c in zip(*rows, strict=True))
        print(f"{k:>3} {s:8.1f} {v:8.4f} {t:8.4f}", flush=True)


if __name__ == "__main__":
    main()
