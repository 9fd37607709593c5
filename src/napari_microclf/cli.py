"""The ``microclf`` command: train, evaluate, predict, sample, demo.

Errors exit with status 1 and one clear line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULTS_NOTE = "defaults follow the training guide"


class _Bar:
    """A Keras-like progress bar on stderr (only on a terminal; logs stay clean)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.active = False

    def show(self, done: int, total: int, suffix: str = "") -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "=" * max(filled - 1, 0) + (">" if filled < width else "=") + "." * (width - filled)
        self.stream.write(f"\r{done}/{total} [{bar}] {suffix}"[:160].ljust(80))
        self.stream.flush()
        self.active = True

    def clear(self) -> None:
        if self.active:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()
            self.active = False


def _print_update(update, bar: _Bar) -> None:
    from .core.train import BatchEnd, EpochEnd, Message, Progress

    if isinstance(update, BatchEnd):
        logs = " - ".join(f"{k}: {v:.4f}" for k, v in update.logs.items()
                          if k in ("loss", "accuracy"))
        bar.show(update.batch, update.steps, logs)
        return
    if isinstance(update, Progress):
        bar.show(update.done, update.total, update.text)
        if update.done == update.total:
            bar.clear()
            print(update.text, flush=True)
        return
    bar.clear()
    if isinstance(update, Message) and update.level == "warning":
        print(f"Warning: {update.text}", flush=True)
    elif isinstance(update, EpochEnd) or hasattr(update, "text"):
        print(update.text, flush=True)


def _parse_fraction(text: str) -> float:
    v = float(text)
    return v / 100 if v >= 1 else v


def cmd_train(args) -> int:
    from .core.images import parse_channel_map
    from .core.train import TrainConfig, train

    config = TrainConfig(
        data_dir=args.data, out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, image_size=args.image_size,
        val_split=_parse_fraction(args.val_split), test_split=_parse_fraction(args.test_split),
        augment=not args.no_augment, augment_strength=args.augment_strength,
        dropout=args.dropout, class_weights=not args.no_class_weights,
        early_stopping=not args.no_early_stopping, weights=args.weights,
        fine_tune=args.fine_tune, seed=args.seed, channel_map=parse_channel_map(args.channels),
        resize_mode=args.resize, resplit=args.resplit, cache=not args.no_cache,
        views=args.views,
    )
    bar = _Bar()
    result = train(config, on_update=lambda u: _print_update(u, bar))
    bar.clear()
    return 2 if result.stopped else 0


def cmd_evaluate(args) -> int:
    from .core.evaluate import evaluate as run_evaluate
    from .core.evaluate import format_report_md

    report = run_evaluate(args.model, args.data, subset=args.subset)
    print(format_report_md(report, f"{args.subset} report for {args.model}"))
    return 0


def cmd_predict(args) -> int:
    from .core.predict import Predictor, write_csv

    predictor = Predictor(args.model, batch_size=args.batch_size)
    names = predictor.class_names
    results = []
    for p in predictor.predict_paths(args.paths):
        results.append(p)
        if not args.quiet:
            print(f"{p.file}\tpage {p.page}\t{p.label(args.threshold)}\t{p.confidence:.3f}",
                  flush=True)
    if args.csv:
        n = write_csv(results, args.csv, names, args.threshold)
        print(f"Wrote {n} rows to {args.csv}")
    return 0


def cmd_sample(args) -> int:
    from .core.sample import write_sample

    info = write_sample(args.out, n_per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"Dataset: {info['dataset']} ({args.per_class} images in each of 3 classes)")
    print(f"Stack:   {info['stack']} ({len(info['stack_labels'])} pages: "
          f"{', '.join(info['stack_labels'])})")
    return 0


def cmd_demo(args) -> int:
    """Headless end to end: sample data, a short training, prediction of a stack."""
    from .core.model import imagenet_cached
    from .core.predict import Predictor, write_csv
    from .core.sample import write_sample
    from .core.train import FROM_SCRATCH, TrainConfig, train

    out = Path(args.out)
    t0 = time.perf_counter()
    info = write_sample(out, n_per_class=args.per_class, size=96, seed=0)
    print(f"Sample data in {out}: 3 classes x {args.per_class} images, and a "
          f"{len(info['stack_labels'])}-page mixed stack")
    if imagenet_cached():
        print("Using the cached ImageNet weights: frozen EfficientNetB0 base, trained head.")
        config = TrainConfig(str(info["dataset"]), str(out / "model"), epochs=args.epochs,
                             image_size=args.image_size or 224, batch_size=16, weights="imagenet")
    else:
        print("No ImageNet weights in the Keras cache (no download here): training the whole "
              "network from scratch on small images instead. With the weights the defaults "
              "(frozen base, 224 px) apply.")
        settings = {**FROM_SCRATCH, "epochs": args.epochs}
        if args.image_size:
            settings["image_size"] = args.image_size
        config = TrainConfig(str(info["dataset"]), str(out / "model"), **settings)
    bar = _Bar()
    result = train(config, on_update=lambda u: _print_update(u, bar))
    bar.clear()
    if result.stopped:
        return 2
    predictor = Predictor(result.bundle)
    preds = list(predictor.predict_file(info["stack"]))
    print(f"\nPredictions for {info['stack']}:")
    right = 0
    for p, truth in zip(preds, info["stack_labels"], strict=True):
        right += p.class_name == truth
        print(f"  page {p.page:2d}: {p.class_name:<11} ({p.confidence:.2f})   true: {truth}")
    csv = out / "stack_predictions.csv"
    write_csv(preds, csv, predictor.class_names)
    print(f"{right}/{len(preds)} pages right; CSV: {csv}; model: {result.bundle}; "
          f"report: {result.bundle / 'report.md'}; {time.perf_counter() - t0:.0f}s in all")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microclf", description="Microscopy image classification "
                                "with EfficientNetB0 transfer learning (napari-microclf).")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier on DATA/<class>/<images>",
                       description=f"Train a classifier ({DEFAULTS_NOTE}).")
    t.add_argument("data", help="dataset folder with one sub-folder per class")
    t.add_argument("--out", required=True, help="model folder to write (replaced only on success)")
    t.add_argument("--epochs", type=int, default=15, help="passes over the training set (15)")
    t.add_argument("--batch-size", type=int, default=32, help="images per step (32; 8-16 for "
                   "under 100 images per class)")
    t.add_argument("--learning-rate", type=float, default=1e-4, help="starting learning rate "
                   "(1e-4), reduced when the validation loss plateaus")
    t.add_argument("--image-size", type=int, default=224, help="model input side in pixels (224)")
    t.add_argument("--weights", default="imagenet", help="'imagenet' (Keras cache), a .h5 "
                   "file, or 'none'")
    t.add_argument("--fine-tune", default="0", help="unfreeze the top N of 7 stages, or 'all' (0)")
    t.add_argument("--val-split", default="0.2", help="validation fraction or percent (0.2)")
    t.add_argument("--test-split", default="0.1", help="test fraction or percent (0.1)")
    t.add_argument("--resplit", action="store_true", help="draw a new split.json (the test set "
                   "changes)")
    t.add_argument("--seed", type=int, default=0, help="random seed (0)")
    t.add_argument("--dropout", type=float, default=0.2, help="dropout before the last layer (0.2)")
    t.add_argument("--augment-strength", type=float, default=0.05,
                   help="rotation/zoom/contrast range (0.05 = ±5%%)")
    t.add_argument("--no-augment", action="store_true", help="no flips/rotation/zoom/contrast")
    t.add_argument("--no-class-weights", action="store_true", help="do not weight rare classes")
    t.add_argument("--no-early-stopping", action="store_true", help="always run every epoch")
    t.add_argument("--channels", default="auto", help="channel map to RGB, e.g. '0,1,-' (auto)")
    t.add_argument("--resize", choices=["pad", "stretch"], default="pad",
                   help="pad to square then resize (no cropping), or stretch")
    t.add_argument("--views", type=int, default=4, help="augmented views per training image "
                   "whose backbone features are cached (4)")
    t.add_argument("--no-cache", action="store_true", help="frozen base: run the full "
                   "pipeline every epoch instead of cached backbone features")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model on the dataset's persisted test split")
    e.add_argument("model")
    e.add_argument("data")
    e.add_argument("--subset", choices=["test", "val", "train"], default="test")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify images, stacks or folders")
    pr.add_argument("model")
    pr.add_argument("paths", nargs="+", help="image files, stacks or folders")
    pr.add_argument("--csv", help="write the results to this CSV file")
    pr.add_argument("--threshold", type=float, default=0.0,
                    help="confidence below which the class reads 'uncertain' (0)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--quiet", action="store_true", help="print only the CSV summary")
    pr.set_defaults(func=cmd_predict)

    s = sub.add_parser("sample", help="write the synthetic sample dataset and stack")
    s.add_argument("out")
    s.add_argument("--per-class", type=int, default=40)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="headless end to end: sample, short training, prediction")
    d.add_argument("--out", default="microclf-demo")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--per-class", type=int, default=150)
    d.add_argument("--image-size", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


def _start_tensorflow_quietly() -> None:
    """Import TensorFlow and set up its devices with stderr's file descriptor muted.

    TensorFlow 2.21 writes start-up lines (oneDNN, CUDA probing) from C++ before any setting
    can silence them. Python errors still raise as usual. Where stderr has no descriptor
    (inside pytest's capture, say) the import is plain.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    saved = devnull = None
    if fd is not None:
        sys.stderr.flush()
        saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
    try:
        import tensorflow as tf

        tf.config.list_logical_devices()
    finally:
        if fd is not None:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(devnull)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        if args.command != "sample" and not args.debug:
            _start_tensorflow_quietly()
        return args.func(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"microclf: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
