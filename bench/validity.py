"""Validity on real data: what the default classifier, ``--preset auto`` and the training
guide's recipe score on real labelled images, beside a logistic regression on the same
features.

    python bench/validity.py                       # every set, recipe and seed (hours)
    python bench/validity.py --sets plankton mri-imbalanced --recipes default guide --seeds 0 1 2

The sets (bench/real_data.py) come from two PyPI wheels read as zip files: ``plankton`` (105
micrographs, 6 classes), ``mri`` (3,000 MRI slices, 2 classes) and ``mri-imbalanced`` (1,100
of them, 10:1). Each seed draws a new split (``resplit``), so over seeds the test sets differ:
a repeated hold-out, the cross-validation of a 105-image set whose test set holds 10 images.

For each run it prints the test accuracy, balanced accuracy and macro-F1, the epochs, the
minutes, and for the frozen recipes the reference: a logistic regression (scikit-learn,
L-BFGS) on the training's own cached features, its L2 strength and class weighting chosen on
the validation set by macro-F1, scored on the same test list. A majority-class guess is
printed too. The tables of docs/validity.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine
from real_data import SETS, real_dataset

# "auto-unlimited": --preset auto without its time budget (the same recipe, every epoch)
RECIPES = ("default", "auto", "auto-unlimited", "guide")


def config_of(recipe: str, data: Path, out: Path, seed: int, image_size: int, **override):
    from napari_microclf.core.train import TrainConfig, preset_for

    name = {"default": "none", "auto-unlimited": "auto"}.get(recipe, recipe)
    preset = preset_for(name, data)
    settings = dict(preset.settings) if preset else {}
    if recipe == "auto-unlimited":
        settings["time_budget"] = None
    settings.update(override)
    settings = {"resplit": True, **settings}
    return TrainConfig(str(data), str(out), seed=seed, image_size=image_size, **settings)


def cached_features(config):
    """The training's own cached features (read back from the dataset's cache) and labels."""
    from napari_microclf.core import train as T
    from napari_microclf.core.engine import resolve_engine
    from napari_microclf.core.model import build_classifier, resolve_weights, weights_identity

    resolved = resolve_weights(config.backbone, config.weights)
    samples = T.samples_of(config)
    model = build_classifier(
        len(samples.class_names),
        config.image_size,
        resolved.weights,
        config.dropout,
        config.augment,
        config.augment_strength,
        0,
        config.seed,
        resolved.backbone,
        warn=False,
    )
    wid = weights_identity(resolved.backbone, resolved.weights, config.seed)
    engine = resolve_engine(config.engine)
    feats = T._features(config, samples, model, wid, lambda u: None, None, engine=engine)
    y = {s: np.asarray([r.label for r in getattr(samples, s)]) for s in ("train", "val", "test")}
    return {s: np.asarray(feats[s]) for s in feats}, y


def logistic_reference(feats: dict, y: dict) -> dict:
    """A logistic regression on the same features: C and class weighting chosen on the
    validation set by macro-F1, scored on the test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    x_train = feats["train"].reshape(-1, feats["train"].shape[-1])
    y_train = np.repeat(y["train"], feats["train"].shape[1])
    best = None
    for weighting in (None, "balanced"):
        for c in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = LogisticRegression(C=c, max_iter=3000, class_weight=weighting)
                m.fit(x_train, y_train)
            f1 = f1_score(y["val"], m.predict(feats["val"]), average="macro")
            if best is None or f1 > best[0]:
                best = (f1, c, weighting, m)
    _, c, weighting, m = best
    p = m.predict(feats["test"])
    return {
        "accuracy": accuracy_score(y["test"], p),
        "balanced_accuracy": balanced_accuracy_score(y["test"], p),
        "macro_f1": f1_score(y["test"], p, average="macro"),
        "C": c,
        "class_weight": weighting or "none",
        "predicted": [int(v) for v in p],
    }


def _log(update) -> None:
    """The training's lines (not its per-batch updates) on stderr, to follow a long run."""
    from napari_microclf.core.train import BatchEnd, Progress

    if not isinstance(update, (BatchEnd, Progress)) and hasattr(update, "text"):
        print(update.text, file=sys.stderr, flush=True)


def write_fold(data: Path, fold: int, k: int) -> None:
    """``data/split.json`` for fold ``fold`` of a stratified ``k``-fold cross-validation:
    each class's files (in a fixed shuffled order) are dealt into ``k`` folds; fold ``fold``
    is the test set, the next one the validation set, the rest the training set. Over the
    ``k`` folds every image is tested exactly once."""
    import random

    from napari_microclf.core.dataset import (
        Split,
        _save_split,
        class_files,
        list_classes,
        update_split,
    )

    update_split(data, 0.2, 0.2, 0, resplit=True)  # the groups and hashes of every file
    from napari_microclf.core.dataset import load_split

    split: Split = load_split(data)
    for c in list_classes(data):
        files = sorted(f"{c}/{p.name}" for p in class_files(data, c))
        random.Random(0).shuffle(files)
        for i, key in enumerate(files):
            f = i % k
            split.assignments[key] = (
                "test" if f == fold else "val" if f == (fold + 1) % k else "train"
            )
    split.val_fraction = split.test_fraction = 1 / k
    _save_split(data, split)


def run(
    recipe: str,
    name: str,
    seed: int,
    image_size: int,
    root: Path,
    fold: tuple[int, int] | None = None,
    **override,
) -> dict:
    from napari_microclf.core.train import train

    data = real_dataset(name, root)
    if fold is not None:  # (fold, k): the fold's split, kept (no resplit)
        write_fold(data, *fold)
        override = {**override, "resplit": False}
    with tempfile.TemporaryDirectory(prefix="microclf-validity-") as out:
        config = config_of(recipe, data, Path(out) / "model", seed, image_size, **override)
        t0 = time.perf_counter()
        result = train(config, on_update=_log)
        minutes = (time.perf_counter() - t0) / 60
    report = result.report
    counts = np.asarray([c["support"] for c in report["per_class"]])
    row = {
        "set": name,
        "recipe": recipe,
        "seed": seed,
        "image_size": image_size,
        "n_test": report["n"],
        "majority": float(counts.max() / max(counts.sum(), 1)),
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_f1": report["macro_f1"],
        "epochs": result.epochs_run,
        "minutes": round(minutes, 2),
        "phases": result.meta.get("phases"),
        "override": override,
        "fold": list(fold) if fold else None,
        # each test image's true and predicted class: folds pool into one score
        "true": [report["class_names"].index(p["true"]) for p in report["pages"]],
        "predicted": [report["class_names"].index(p["predicted"]) for p in report["pages"]],
    }
    if result.meta.get("cached_features") and result.meta.get("fine_tune") == 0:
        row["logistic"] = logistic_reference(*cached_features(config))
    return row


def summary(rows: list[dict]) -> str:
    """Mean ± standard deviation over seeds, one line per set and recipe (Markdown)."""
    lines = [
        "| set | recipe | seeds | accuracy | balanced acc. | macro-F1 | logistic regression "
        "macro-F1 | majority | epochs | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    keys = sorted(
        {(r["set"], r["recipe"]) for r in rows}, key=lambda k: (k[0], RECIPES.index(k[1]))
    )
    for s, recipe in keys:
        rs = [r for r in rows if r["set"] == s and r["recipe"] == recipe]
        lines.append(
            f"| {s} | {recipe} | {len(rs)} | {ms([r['accuracy'] for r in rs])} | "
            f"{ms([r['balanced_accuracy'] for r in rs])} | {ms([r['macro_f1'] for r in rs])} | "
            f"{ms([r.get('logistic', {}).get('macro_f1') for r in rs])} | "
            f"{ms([r['majority'] for r in rs])} | {ms([r['epochs'] for r in rs])} | "
            f"{ms([r['minutes'] for r in rs])} |"
        )
    pooled = [r for r in rows if r.get("fold")]
    for s, recipe in sorted({(r["set"], r["recipe"]) for r in pooled}):
        rs = [r for r in pooled if r["set"] == s and r["recipe"] == recipe]
        k = rs[0]["fold"][1]
        t = np.concatenate([r["true"] for r in rs])
        scores = {"microclf": np.concatenate([r["predicted"] for r in rs])}
        if all("logistic" in r for r in rs):
            scores["logistic regression"] = np.concatenate([r["logistic"]["predicted"] for r in rs])
        for who, p in scores.items():
            lines.append(
                f"\n{s}, {recipe}, {len(rs)} of {k} folds pooled ({len(t)} test images), "
                f"{who}: accuracy {np.mean(p == t):.3f}, balanced accuracy "
                f"{_balanced(t, p):.3f}, macro-F1 {_macro_f1(t, p):.3f}"
            )
    return "\n".join(lines)


def _confusion(t, p) -> np.ndarray:
    k = int(max(t.max(), p.max())) + 1
    cm = np.zeros((k, k))
    np.add.at(cm, (t, p), 1)
    return cm


def _balanced(t, p) -> float:
    from napari_microclf.core.metrics import balanced_accuracy

    return balanced_accuracy(_confusion(t, p))


def _macro_f1(t, p) -> float:
    from napari_microclf.core.metrics import macro_f1

    return macro_f1(_confusion(t, p))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--json", type=Path, help="append each run as a JSON line")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig setting over the recipe's (e.g. fine_tune_lr_factor=0.3)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        help="k-fold cross-validation instead of seeds (every image tested once; for the "
        "105-image plankton set)",
    )
    parser.add_argument("--summary", type=Path, help="only print the table of a --json file")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary([json.loads(line) for line in args.summary.read_text().splitlines()]))
        return
    override = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            override[key] = json.loads(value)
        except json.JSONDecodeError:
            override[key] = value
    print(f"# validity on {machine()}", flush=True)
    rows = []
    for name in args.sets:
        for recipe in args.recipes:
            runs = (
                [(0, (f, args.folds)) for f in range(args.folds)]
                if args.folds
                else [(seed, None) for seed in args.seeds]
            )
            for seed, fold in runs:
                row = run(recipe, name, seed, args.image_size, args.data, fold, **override)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(summary(rows))


if __name__ == "__main__":
    main()
