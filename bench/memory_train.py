"""Peak memory of a training on the full images (fine-tuning, or ``cache=False``) for a small
and a ten-times larger dataset (issue 11: streaming training with bounded memory).

Each training runs in its own process, so its peak resident memory (``ru_maxrss``) is its
own. Goal: the larger dataset's peak within 1.3x the smaller one's (memory set by the batch
and the shuffle buffer, not the dataset).

    .venv/bin/python bench/memory_train.py                  # 500 and 5,000 images at 64 px
    .venv/bin/python bench/memory_train.py --sizes 300 3000 --fine-tune 0
    .venv/bin/python bench/memory_train.py --page-memory-mb 0   # every page read every epoch

``--page-memory-mb`` sets ``$MICROCLF_PAGE_MEMORY_MB`` for the trainings: the decoded pages
kept between epochs (default: min(1 GiB, available memory / 8)); 0 measures pure streaming.

Before streaming (2026-11-28, 2-core AMD EPYC, TensorFlow 2.21, fine-tune all, 1 epoch,
images decoded into memory and copied into tf.data): 500 images 1695 MiB, 5000 images
2112 MiB, 1.25x: 417 MiB for 4500 more images, about 95 kB each, two float32 copies of a
64 x 64 x 3 image. At 224 px the same two copies are 1.2 MB per image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common


def child(data: str, out: str, fine_tune: str, image_size: int, epochs: int) -> None:
    """One training (in a process of its own); prints its summary as JSON."""
    import warnings

    from napari_microclf.core.train import TrainConfig, train

    warnings.simplefilter("ignore")
    ft = fine_tune if fine_tune == "all" else int(fine_tune)
    config = TrainConfig(
        data,
        out_dir=out,
        epochs=epochs,
        head_epochs=0,
        image_size=image_size,
        weights=None,
        fine_tune=ft,
        cache=False,  # the full-image path, whatever the fine-tuning
        early_stopping=False,
    )
    t0 = time.perf_counter()
    result = train(config)
    print(
        json.dumps({"seconds": time.perf_counter() - t0, "accuracy": result.report.get("accuracy")})
    )


def run_one(data: Path, out: Path, args) -> dict:
    """Train on ``data`` in a child process; its summary and peak resident memory."""
    cmd = [sys.executable, __file__, "--child", str(data), str(out), args.fine_tune]
    cmd += [str(args.image_size), str(args.epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training on {data} failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {**summary, "peak_mib": peak / 1024}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 5000], help="images in all")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fine-tune", default="all", help="stages unfrozen (all, or 0-7)")
    p.add_argument("--work", default=None, help="folder for the data (kept between runs)")
    p.add_argument(
        "--page-memory-mb",
        default=None,
        help="decoded pages kept between epochs, MB (default: the training's own budget)",
    )
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / "microclf-bench")
    if args.single:  # one size in this interpreter: RUSAGE_CHILDREN sees its child only
        data = _common.sample_dataset(work, n_per_class=args.sizes[0] // 3, size=args.image_size)
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(run_one(data, Path(out) / "model", args)))
        return
    print(_common.machine())
    if args.page_memory_mb is not None:
        os.environ["MICROCLF_PAGE_MEMORY_MB"] = str(args.page_memory_mb)
    budget = os.environ.get("MICROCLF_PAGE_MEMORY_MB", "default (min(1 GiB, available / 8))")
    print(f"page memory between epochs: {budget} MB")
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--single", "--sizes", str(n), "--work", str(work)]
        cmd += ["--image-size", str(args.image_size), "--epochs", str(args.epochs)]
        cmd += ["--fine-tune", args.fine_tune]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((n, r))
        print(
            f"{n:6d} images at {args.image_size} px, fine-tune {args.fine_tune}, "
            f"{args.epochs} epoch(s): peak {r['peak_mib']:.0f} MiB, {r['seconds']:.0f} s, "
            f"test accuracy {r['accuracy']}",
            flush=True,
        )
    (small, rs), (big, rb) = rows[0], rows[-1]
    print(
        f"peak memory ratio {big} / {small} images: {rb['peak_mib'] / rs['peak_mib']:.2f}x "
        "(goal <= 1.3x)"
    )


if __name__ == "__main__":
    if "--child" in sys.argv:
        a = sys.argv[sys.argv.index("--child") + 1 :]
        child(a[0], a[1], a[2], int(a[3]), int(a[4]))
    else:
        main()
