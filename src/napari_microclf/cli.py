"""The ``microclf`` command: train, evaluate, predict, explain, export, sample, demo.

Errors a user can fix (ours, and the environment's: a full disk, a denied permission) exit
with status 1 and one clear line (a list of bad images below it); anything else is a bug and
shows its traceback. ``--debug`` raises every error with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

_PYTHON_FORMAT = warnings.formatwarning

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
        logs = " - ".join(
            f"{k}: {v:.4f}" for k, v in update.logs.items() if k in ("loss", "accuracy")
        )
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


def _parse_fine_tune(text: str):
    return text if text.strip().lower() == "all" else int(text)


# TrainConfig fields that the command line offers; the help of each comes from the field.
_PARSERS = {"fraction": _parse_fraction, "intensity": str}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per documented TrainConfig setting, its help and default from the field.

    Options default to None (unset), so ``--preset`` can fill exactly the ones not given.
    """
    from .core.train_config import TrainConfig

    for name, f in TrainConfig.__dataclass_fields__.items():
        md = f.metadata
        if "help" not in md:
            continue
        flag = md.get("cli") or "--" + name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(
                flag,
                dest=name,
                action="store_const",
                default=None,
                const=not f.default,
                help=md.get("off", md["help"]),
            )
            continue
        kind = {"channels": str}.get(md.get("parse"), _PARSERS.get(md.get("parse")))
        if kind is None:
            kind = {int: int, float: float}.get(type(f.default), str)
        if name == "fine_tune":
            kind = _parse_fine_tune
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            choices=md.get("choices"),
            metavar=None if md.get("choices") else name.upper(),
            help=md["help"],
        )


def _config_from_args(args, out: str):
    from .core.images import parse_channel_map
    from .core.train import TrainConfig, preset_for

    given = {
        k: v
        for k, v in vars(args).items()
        if k in TrainConfig.__dataclass_fields__ and v is not None and k != "data_dir"
    }
    if "channel_map" in given:
        given["channel_map"] = parse_channel_map(given["channel_map"])
    preset = preset_for(getattr(args, "preset", "none"), args.data)
    if preset is not None:
        kept = sorted(k for k in preset.settings if k in given)
        print(
            preset.text + (f" Kept from the command line: {', '.join(kept)}." if kept else ""),
            flush=True,
        )
        given = {**preset.settings, **given}
    return TrainConfig(data_dir=args.data, out_dir=out, **given)


def _train_config_checked(args):
    """The training's settings, folders and images, checked before TensorFlow starts: a wrong
    value, a missing dataset, an unwritable --out or bad images are said within seconds."""
    from .core.errors import MicroclfError
    from .core.model import check_backbone, normalize_weights, parse_fine_tune
    from .core.preflight import preflight

    try:
        config = _config_from_args(args, args.out)
        check_backbone(config.backbone)
        parse_fine_tune(config.fine_tune)
        normalize_weights(config.weights)
    except MicroclfError:
        raise
    except ValueError as exc:  # a setting's own message names it and its allowed values
        raise MicroclfError(str(exc)) from exc
    preflight(config)  # the folders and every image's header; train() says its notes
    return config


def cmd_train(args) -> int:
    from .core.train import train

    config = getattr(args, "config", None) or _train_config_checked(args)
    bar = _Bar()
    result = train(config, on_update=lambda u: _print_update(u, bar))
    bar.clear()
    return 2 if result.stopped else 0


def cmd_evaluate(args) -> int:
    from .core.evaluate import evaluate as run_evaluate
    from .core.report import format_report_md

    report = run_evaluate(
        args.model,
        args.data,
        subset=args.subset,
        all_images=args.all,
        tta=args.tta,
        engine=args.engine,
        precision=args.precision,
    )
    print(format_report_md(report))
    if report.get("saved"):
        print(f"Report saved to {report['saved']}")
    return 0


def cmd_cache(args) -> int:
    import datetime as _dt

    from .core.features import CACHE_DIR, cache_entries, clear_cache

    if args.action == "clear":
        freed, left = clear_cache(args.data)
        print(f"Removed the feature cache of {args.data} ({freed / 2**20:.1f} MB).")
        if left:
            print(
                f"Left in {Path(args.data) / CACHE_DIR} what microclf did not write: "
                + ", ".join(left)
            )
        return 0
    entries = cache_entries(args.data)
    if not entries:
        print(f"{args.data} has no feature cache.")
        return 0
    total = sum(e["bytes"] for e in entries)
    print(f"Feature cache of {args.data}: {len(entries)} folder(s), {total / 2**20:.1f} MB")
    for e in entries:
        f = e["fields"]
        spec = f.get("spec", {})
        when = _dt.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        print(
            f"  {e['key']}: {e['files']} file(s), {e['bytes'] / 2**20:.1f} MB, last used "
            f"{when}; {f.get('weights', '?')}, {spec.get('image_size', '?')} px, "
            f"{spec.get('intensity', 'percentile')} intensity, augmentation "
            f"{f.get('augment')}, code v{f.get('features_version', '?')}, TF "
            f"{f.get('tensorflow', '?')}"
        )
    return 0


def _features_config_checked(args):
    """The features' settings (train's options) and the dataset, checked before TensorFlow
    starts; returns the config and the lines the checks have to say."""
    from .core.errors import MicroclfError
    from .core.features_cluster import check_features
    from .core.model import check_backbone, normalize_weights, parse_fine_tune

    try:
        config = _config_from_args(args, "microclf-model")  # no model is written
        check_backbone(config.backbone)
        parse_fine_tune(config.fine_tune)
        normalize_weights(config.weights)
    except MicroclfError:
        raise
    except ValueError as exc:
        raise MicroclfError(str(exc)) from exc
    return config, check_features(config)


def cmd_features(args) -> int:
    """Features into the dataset's cache: exit 0 when every file was done, 1 when a file
    failed, 2 when stopped."""
    import contextlib

    from .core.features_cluster import compute_features

    config, lines = args.config if hasattr(args, "config") else _features_config_checked(args)
    for line in lines:
        print(line, flush=True)
    bar = _Bar()
    if args.cluster:
        from .core.cluster import connected

        context = connected(args.cluster)
    else:
        context = contextlib.nullcontext()
    with context as client:
        summary = compute_features(
            config, client, on_update=lambda u: _print_update(u, bar), check=False
        )
    bar.clear()
    print(summary.text(), flush=True)
    if summary.failed:
        print(
            f"{len(summary.failed)} file(s) failed (listed above); fix or remove them, then "
            "run features again: only what is missing is computed",
            flush=True,
        )
    return 2 if summary.stopped else 1 if summary.failed else 0


def cmd_predict(args) -> int:
    """Classify past bad files: exit 0 when a page was classified, 1 when none was."""
    from .core.folder_runs import predict_folder
    from .core.predictor import Predictor
    from .core.report import describe_model
    from .core.results import FileError

    csv_path, files = args.checked if hasattr(args, "checked") else _predict_checked(args)
    options = _predict_options(args)
    if args.labels or args.labels_suffix:
        return _predict_objects(args, csv_path, files, options)
    if args.cluster:  # the workers load the model; here only its description is needed
        from .core.bundle import read_meta

        predictor = None
        shown, meta = Path(args.model).expanduser(), read_meta(args.model)
    else:
        predictor = Predictor(args.model, options=options)
        shown, meta = predictor.bundle.path, predictor.bundle.meta
    if not args.quiet:
        print(
            f"Model: {shown} ({describe_model(meta)}); "
            f"classes: {', '.join(meta['class_names'])}"
            + (
                "; test-time augmentation: probabilities averaged over 4 flipped views"
                if args.tta
                else ""
            ),
            flush=True,
        )
    bar = _Bar()
    pace = {"shown": 0.0, "pages": 0, "files": set(), "marks": []}

    def progress(item) -> None:
        """The bar on stderr: files begun, pages done and the pace over the last 10 s (so
        the start-up, a model load or a cluster's first tasks, fades out of it)."""
        pace["files"].add(item.path if isinstance(item, FileError) else item.file)
        pace["pages"] += not isinstance(item, FileError)
        now = time.monotonic()
        if not bar.enabled or now - pace["shown"] < 0.2:
            return
        pace["shown"] = now
        marks = pace["marks"]
        marks.append((now, pace["pages"]))
        while now - marks[0][0] > 10 and len(marks) > 2:
            marks.pop(0)
        rate = (pace["pages"] - marks[0][1]) / max(now - marks[0][0], 1e-9)
        bar.show(
            len(pace["files"]),
            len(files),
            f"files - {pace['pages']} pages" + (f", {rate:.1f} pages/s" if rate else ""),
        )

    def show(item) -> None:
        if args.quiet:
            progress(item)
            return
        bar.clear()
        if isinstance(item, FileError):
            page = "" if item.page is None else f"page {item.page}"
            print(f"{item.path}\t{page}\terror\t{item.message}", flush=True)
        else:
            score = item.unfamiliar_score  # None: a model from before familiarity scores
            print(
                f"{item.file}\tpage {item.page}\t{item.label(args.threshold)}\t"
                f"{item.confidence:.3f}" + ("" if score is None else f"\tunfamiliar {score:.2f}"),
                flush=True,
            )
        progress(item)

    try:
        result = predict_folder(
            predictor or args.model,
            files,
            csv_path,
            options=options,
            on_item=show,
            client=args.cluster,
            resume=args.resume,
            chunk_pages=args.chunk_pages,
        )
    except KeyboardInterrupt:
        bar.clear()
        if csv_path is not None:
            print(
                f"Interrupted: the rows so far are in {csv_path}.partial; run the same "
                "command with --resume to continue",
                file=sys.stderr,
            )
        raise
    bar.clear()
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


def _predict_objects(args, csv_path, pairs, options) -> int:
    """``predict --labels``: one row per object (printed, and in the CSV)."""
    from .core.bundle import read_meta
    from .core.csv_format import write_csv
    from .core.predict_objects import classify_objects
    from .core.predictor import Predictor
    from .core.results import FileError

    def show(item) -> None:
        if args.quiet:
            return
        if isinstance(item, FileError):
            print(f"{item.path}\t\terror\t{item.message}", flush=True)
        else:
            print(
                f"{item.file}\tpage {item.page}\tlabel {item.object_label}\t"
                f"{item.label(args.threshold)}\t{item.confidence:.3f}",
                flush=True,
            )

    if args.cluster:  # the workers load the model; here only its classes are needed
        class_names = read_meta(args.model)["class_names"]
        result = _objects_on_cluster(args, pairs, options, show)
    else:
        predictor = Predictor(args.model, options=options)
        class_names = predictor.class_names
        result = classify_objects(predictor, pairs, tta=options.tta, on_item=show)
    if csv_path is not None:
        write_csv(
            [*result.predictions, *result.errors],
            csv_path,
            class_names,
            options.threshold,
            status=True,
            objects=True,
        )
    print(result.summary() + (f". CSV: {csv_path}" if csv_path else ""), flush=True)
    return 0 if result.predictions else 1


def _objects_on_cluster(args, pairs, options, show):
    """``predict --labels ... --cluster``: each image's pages as tasks on the workers."""
    from .core.cluster import classify_on_cluster, connected
    from .core.predict_objects import ObjectsResult
    from .core.results import FileError

    result = ObjectsResult(n_images=len(pairs))
    labels = {str(image): lab for image, lab in pairs}
    with connected(args.cluster) as client:
        batches = classify_on_cluster(
            client,
            args.model,
            [image for image, _ in pairs],
            options=options,
            chunk_pages=args.chunk_pages or 1,
            labels=labels,
        )
        try:
            for batch in batches:
                for item in batch:
                    is_error = isinstance(item, FileError)
                    (result.errors if is_error else result.predictions).append(item)
                    show(item)
        finally:
            batches.close()
    return result


def _predict_checked(args):
    """Before TensorFlow starts: the model folder, where the CSV goes, and that there is
    something to classify (each a one-line error)."""
    from .core.bundle import read_meta
    from .core.csv_format import check_csv_destination
    from .core.predict_objects import check_model_kind

    meta = read_meta(args.model)
    objects = bool(args.labels or args.labels_suffix)
    check_model_kind(meta, args.model, objects)  # a model of objects needs labels, and back
    csv_path = check_csv_destination(args.csv) if args.csv else None
    if args.resume and csv_path is None:
        from .core.errors import OutputError

        raise OutputError(
            "--resume needs the CSV of the interrupted run: give --csv PATH, the same "
            "PATH whose PATH.partial holds the rows so far"
        )
    if args.cluster:
        from .core.cluster import check_spec

        check_spec(args.cluster)
    if objects and args.resume:
        from .core.errors import MicroclfError

        raise MicroclfError("--resume is for images; objects (--labels) are classified afresh")

    pairs, files = _inputs(args, objects)
    if csv_path is not None:
        _csv_destroys_nothing(csv_path, files, [args.model])
    return csv_path, pairs or files


def _inputs(args, objects: bool):
    """``(pairs, files)``: with labels (``objects``), each image of ``args.paths`` with its
    label file and every file of them; else ``(None, the images)``. A one-line error when
    there is nothing, or an image without its labels."""
    from .core.images import find_images
    from .core.predict_objects import label_pairs

    if not objects:
        return None, find_images(args.paths)
    pairs = label_pairs(args.paths, args.labels, args.labels_suffix)
    return pairs, [f for pair in pairs for f in pair]


def _csv_destroys_nothing(csv_path, inputs, protected) -> None:
    """A CSV destination (checked writable already) that is not an input image, not in or
    above the model folder (or the dataset), not the working directory."""
    from .core.files import refuse_destroying

    refuse_destroying(csv_path, inputs=inputs, protected=protected, what="CSV destination")


def _explain_checked(args):
    """Before TensorFlow starts: the model folder, the class name, the image, the page and
    where the TIFF goes (each a one-line error)."""
    from .core.bundle import read_meta
    from .core.explain import check_tiff_destination, class_index_of
    from .core.images import count_pages

    meta = read_meta(args.model)
    class_index_of(list(meta["class_names"]), args.class_name)
    n = count_pages(args.image)
    if args.page is not None and not 0 <= args.page < n:
        from .core.images import ImageReadError

        raise ImageReadError(f"{args.image} has {n} page(s) (0..{n - 1}), no page {args.page}")
    from .core.files import refuse_destroying

    refuse_destroying(
        args.out, inputs=[args.image], protected=[args.model], what="heatmap destination"
    )
    return check_tiff_destination(args.out)


def cmd_explain(args) -> int:
    """Grad-CAM of every page (or --page N) of one image into a float32 TIFF."""
    import numpy as np

    from .core.explain import Explainer, explain_file, write_heatmaps

    out = args.checked if hasattr(args, "checked") else _explain_checked(args)
    explainer = Explainer(args.model)
    pages = None if args.page is None else [args.page]
    maps = []
    for e in explain_file(explainer, args.image, args.class_name, pages):
        maps.append(e.heatmap)
        which = "" if e.class_index == e.predicted else f"; heatmap for {e.class_name}"
        print(f"page {e.page}: {e.predicted_name} ({e.confidence:.3f}){which}", flush=True)
    heat = np.stack(maps) if len(maps) > 1 else maps[0]
    write_heatmaps(out, heat)
    print(
        f"Wrote {'x'.join(str(s) for s in heat.shape)} float32 Grad-CAM heatmap"
        f"{'s' if len(maps) > 1 else ''} (0-1) to {out}",
        flush=True,
    )
    return 0


def cmd_label_next(args) -> int:
    """The pages (or objects) most worth labelling next, most uncertain first (optionally as
    a CSV)."""
    from .core.active import label_next
    from .core.bundle import read_meta
    from .core.csv_format import check_csv_destination, write_csv_rows
    from .core.predict_objects import check_model_kind

    meta = read_meta(args.model)
    objects = bool(args.labels or args.labels_suffix)
    check_model_kind(meta, args.model, objects)
    _, files = _inputs(args, objects)  # nothing to rank: a one-line error before TensorFlow
    data = args.data or meta.get("data_dir")
    if args.csv:
        check_csv_destination(args.csv)
        _csv_destroys_nothing(args.csv, files, [args.model, *([data] if data else [])])
    cands = label_next(
        args.model,
        args.paths,
        args.top,
        args.by,
        args.unfamiliar,
        data,
        labels=args.labels,
        labels_suffix=args.labels_suffix,
    )
    what = "object" if objects else "page"
    print(
        f"{len(cands)} {what}(s) to label next ({args.by} uncertainty, unfamiliar "
        f"{args.unfamiliar}; {what}s already in {data} left out):"
    )
    for i, c in enumerate(cands, 1):
        print(
            f"{i:3d}. {c.file}\tpage {c.page}"
            + (f"\tlabel {c.label}" if objects else "")
            + f"\tguess {c.guess} ({c.confidence:.3f})\tuncertainty {c.uncertainty:.3f}"
            + ("\tunfamiliar" if c.unfamiliar else "")
        )
    if args.csv:
        header = ["rank", "file", "page", *(["label"] if objects else []), "guess"]
        header += ["confidence", "uncertainty", "unfamiliar"]
        rows = [
            [
                i,
                c.file,
                c.page,
                *([c.label] if objects else []),
                c.guess,
                f"{c.confidence:.4f}",
                f"{c.uncertainty:.4f}",
                int(c.unfamiliar),
            ]
            for i, c in enumerate(cands, 1)
        ]
        write_csv_rows(args.csv, [header, *rows])
        print(f"Wrote {len(rows)} rows to {args.csv}")
    return 0


def cmd_retrain(args) -> int:
    """Train MODEL again with its own settings, then compare on its old test list."""
    from .core.active import retrain
    from .core.bundle import read_meta

    read_meta(args.model)
    bar = _Bar()
    result = retrain(args.model, on_update=lambda u: _print_update(u, bar))
    bar.clear()
    if result.train_result.bundle is None:
        print("Stopped: the model is unchanged.")
        return 2
    print(result.summary())
    return 0


def cmd_restore(args) -> int:
    from .core.bundle import describe_bundle, restore_previous

    meta = restore_previous(args.model)
    print(
        f"Restored the previous model in {args.model}: {describe_bundle(meta)}. The model "
        "it replaced is now in previous/ (run restore again to switch back)."
    )
    return 0


def cmd_report(args) -> int:
    from .core.report_html import write_report_html

    path = write_report_html(args.model, args.out)
    print(f"Report written to {path} (open it in a web browser)")
    return 0


def _class_table(path) -> dict:
    """``{(page, label): class}`` from a CSV with columns ``label`` and ``class`` (and ``page``
    for stacks; 0 when absent)."""
    import csv

    from .core.errors import DatasetError

    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"label", "class"} <= set(rows[0]):
        raise DatasetError(f"{path} needs the columns label and class (and page for a stack)")
    table = {}
    for n, row in enumerate(rows, start=2):
        try:
            key = (int(row.get("page") or 0), int(row["label"]))
        except ValueError:
            raise DatasetError(
                f"{path} line {n}: label {row['label']!r} and page must be whole numbers"
            ) from None
        if row["class"].strip():
            table[key] = row["class"].strip()
    return table


def cmd_objects_add(args) -> int:
    """Put objects of IMAGE (segmented by LABELS) into DATA's class folders."""
    from collections import Counter

    from .core.errors import DatasetError
    from .core.objects import CropSpec, add_objects, dataset_crop_spec

    given = {
        k: v
        for k, v in {
            "size": args.crop_size,
            "margin": args.margin,
            "context": args.context,
            "mask": args.mask,
        }.items()
        if v is not None
    }
    spec = CropSpec(**given) if given else None
    assign = _class_table(args.table) if args.table else args.class_name
    try:
        ids = [int(i) for i in args.ids.split(",") if i.strip()] if args.ids else None
    except ValueError:
        raise DatasetError(f"--ids {args.ids!r}: give label numbers, e.g. 3,7,12") from None
    results = add_objects(args.data, args.image, args.labels, assign, spec, ids=ids)
    written = Counter(r.class_name for r in results if r.written)
    n_new = sum(written.values())
    per_class = ", ".join(f"{c}: {n}" for c, n in sorted(written.items()))
    print(
        f"Added {n_new} object(s) to {args.data}"
        + (f" ({per_class})" if per_class else "")
        + (f"; {len(results) - n_new} were there already" if len(results) > n_new else "")
        + f". Crops: {dataset_crop_spec(args.data).describe()}."
    )
    return 0 if results else 1


def cmd_sample(args) -> int:
    from .core.sample import write_sample

    info = write_sample(
        args.out, n_per_class=args.per_class, size=args.size, seed=args.seed, fields=args.fields
    )
    print(f"Dataset: {info['dataset']} ({args.per_class} images in each of 3 classes)")
    print(
        f"Stack:   {info['stack']} ({len(info['stack_labels'])} pages: "
        f"{', '.join(info['stack_labels'])})"
    )
    if info["fields"]:
        cells = info["fields"][0]["image"].parent
        print(
            f"Cells:   {cells} ({len(info['fields'])} fields of labelled cells, each with its "
            "_labels.tif and its _classes.csv: microclf objects add DATA IMAGE LABELS --table ...)"
        )
    return 0


def cmd_demo(args) -> int:
    """Headless end to end: sample data, a training with the defaults, prediction of a stack;
    then the same for objects (cells of labelled fields)."""
    from .core.csv_format import write_csv
    from .core.predictor import Predictor
    from .core.sample import write_sample
    from .core.train import TrainConfig, train

    out = Path(args.out)
    t0 = time.perf_counter()
    info = write_sample(out, n_per_class=args.per_class, size=96, seed=0, fields=4)
    print(
        f"Sample data in {out}: 3 classes x {args.per_class} images, a "
        f"{len(info['stack_labels'])}-page mixed stack and 4 fields of labelled cells"
    )
    # weights "auto": ImageNet B0 if cached or downloadable, else ImageNet Lite0 (installed
    # with microclf), else the from-scratch recipe; frozen base, head on cached features
    config = TrainConfig(
        str(info["dataset"]),
        str(out / "model"),
        image_size=args.image_size or 224,
        weights="auto",
        **({"epochs": args.epochs} if args.epochs else {}),
    )
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
    print(
        f"{right}/{len(preds)} pages right; CSV: {csv}; model: {result.bundle}; "
        f"report: {result.bundle / 'report.md'}"
    )
    if _demo_objects(out, info["fields"], args) is None:
        return 2
    print(f"{time.perf_counter() - t0:.0f}s in all")
    return 0


def _demo_objects(out: Path, fields: list[dict], args):
    """The demo's second part: cells of labelled fields into a dataset of objects, a model
    trained on them, and every cell of a field it never saw classified (None: stopped)."""
    from collections import Counter

    from .core.csv_format import write_csv
    from .core.objects import add_objects
    from .core.predict_objects import predict_objects
    from .core.predictor import Predictor
    from .core.train import TrainConfig, train

    data = out / "cells-dataset"
    for f in fields[:-1]:
        add_objects(data, f["image"], f["labels"], {(0, k): v for k, v in f["truth"].items()})
    print(
        f"\nObjects: the cells of {len(fields) - 1} labelled fields into {data} (one crop "
        "each, grouped by field in the split)"
    )
    config = TrainConfig(
        str(data),
        str(out / "cells-model"),
        image_size=args.image_size or 224,
        **({"epochs": args.epochs} if args.epochs else {}),
    )
    bar = _Bar()
    result = train(config, on_update=lambda u: _print_update(u, bar))
    bar.clear()
    if result.stopped:
        return None
    new = fields[-1]
    cells = list(predict_objects(Predictor(result.bundle), new["image"], new["labels"]))
    right = sum(c.class_name == new["truth"][c.object_label] for c in cells)
    counts = Counter(c.class_name for c in cells)
    csv = out / "cells_predictions.csv"
    write_csv(cells, csv, result.class_names)
    per_class = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
    print(
        f"Cells of {new['image'].name}: {per_class}; {right}/{len(cells)} right; CSV: {csv}; "
        f"model: {result.bundle}"
    )
    return cells


def _export_checked(args) -> Path:
    """The export's format and destination, checked before TensorFlow starts."""
    from .core.export import check_destination, check_format, default_out

    fmt = check_format(args.format)
    return check_destination(
        args.out or default_out(args.model, fmt), fmt, args.overwrite, args.model
    )


def cmd_export(args) -> int:
    from .core.export import export_model

    result = export_model(
        args.model,
        args.format,
        args.checked,
        example=args.example,
        authors=args.author,
        overwrite=args.overwrite,
    )
    check = (
        ""
        if result.max_abs_diff is None
        else f"; probabilities within {result.max_abs_diff:.1g} of the model's"
    )
    print(
        f"Exported {args.model} as {result.format} to {result.path} "
        f"({result.size_bytes / 1e6:.1f} MB, {result.seconds:.0f} s{check})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microclf",
        description="Microscopy image classification "
        "with EfficientNetB0 transfer learning (napari-microclf).",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a classifier on DATA/<class>/<images>",
        description=f"Train a classifier ({DEFAULTS_NOTE}).",
    )
    t.add_argument("data", help="dataset folder with one sub-folder per class")
    t.add_argument("--out", required=True, help="model folder to write (replaced only on success)")
    t.add_argument(
        "--preset",
        choices=["auto", "guide", "none"],
        default="none",
        help="auto: settings for the dataset's size (under 100, 100-1000, over 1000 "
        "images; the guide's rows at the measured head learning rate) for every option not "
        "given; guide: the training guide's exact recipe (learning rate 1e-4, 15 epochs, "
        "balanced class weights, percentile intensity)",
    )
    _add_config_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="score a model on its own test list, or on new images",
        description="Score a model on the test list stored with it (default), "
        "another of its lists (--subset), or every image of a labelled folder "
        "it never saw (--all). Writes a new dated report into MODEL/reports/.",
    )
    e.add_argument("model")
    e.add_argument("data", nargs="?", help="the labelled folder (default: the model's dataset)")
    e.add_argument("--subset", choices=["test", "val", "train"], default="test")
    e.add_argument(
        "--all",
        action="store_true",
        help="every image of DATA that the model never "
        "saw (images of its training and validation lists are flagged, not scored)",
    )
    _add_predict_options(
        e,
        ("tta", "engine", "precision"),
        tta_note="the report's metrics are then those of the averaged probabilities, with "
        "the plain accuracy beside",
    )
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("cache", help="show or clear a dataset's feature cache")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("data")
    c.set_defaults(func=cmd_cache)

    fe = sub.add_parser(
        "features",
        help="compute DATA's backbone features into its feature cache (optionally on a "
        "Dask cluster) so that train only trains the head",
        description="Compute the frozen backbone's features of every page of DATA (training "
        "pages with their augmented views, validation and test pages plain) into DATA's "
        "feature cache, exactly what `microclf train DATA` with the same options reads: give "
        "it the options you will train with. Then the training computes nothing and trains "
        "the head in seconds. With --cluster the files are shared out as tasks to Dask "
        "workers, which read the images and write the cache themselves: they must see DATA "
        "at the same path (a shared file system) and have the same TensorFlow, Keras and "
        "weights. Exit status 0 when every file was done, 1 when a file failed (named with "
        "its reason; the others are done).",
    )
    fe.add_argument("data", help="dataset folder with one sub-folder per class")
    fe.add_argument(
        "--cluster",
        metavar="SPEC",
        help="local:N (N worker processes on this computer) or tcp://HOST:PORT (a running "
        "Dask scheduler, e.g. dask-jobqueue's); default: this process",
    )
    fe.add_argument(
        "--preset",
        choices=["auto", "guide", "none"],
        default="none",
        help="as train's --preset",
    )
    _add_config_arguments(fe)
    fe.set_defaults(func=cmd_features)

    pr = sub.add_parser(
        "predict",
        help="classify images, stacks or folders",
        description="Classify every page of every image, past files that "
        "cannot be read (each listed with its reason). Exit status 0 when a "
        "page was classified, 1 when none was.",
    )
    pr.add_argument("model")
    pr.add_argument("paths", nargs="+", help="image files, stacks or folders")
    pr.add_argument(
        "--csv",
        help="write the results to this CSV file (with status and error "
        "columns); rows go to CSV.partial as they come, renamed to CSV at the end",
    )
    _add_predict_options(pr, ("threshold", "batch_size"))
    pr.add_argument(
        "--quiet",
        action="store_true",
        help="print only the CSV summary (and, on a terminal, the progress bar)",
    )
    pr.add_argument(
        "--cluster",
        metavar="local:N|tcp://HOST:PORT",
        help="classify on a Dask cluster: local:N starts N single-threaded worker processes "
        "here; tcp://HOST:PORT uses a running scheduler (e.g. dask-jobqueue's). Pages go "
        "as file references, the CSV is the same as without --cluster",
    )
    pr.add_argument(
        "--chunk-pages",
        type=int,
        default=None,
        metavar="N",
        help="with --cluster: pages per task (default: the batch size); larger tasks overlap "
        "reading with the model on each worker and load the scheduler less, smaller ones "
        "spread a short run over more workers",
    )
    pr.add_argument(
        "--labels",
        metavar="LABELS",
        help="classify the objects of the one image given: LABELS is its label image (each "
        "object its own whole number, 0 background; one page per image page, or one for all), "
        "for a model trained on objects (microclf objects add); one row per object",
    )
    pr.add_argument(
        "--labels-suffix",
        metavar="SUFFIX",
        help="classify the objects of every image, each with the label file named after it "
        "plus SUFFIX beside it (x.tif with x_labels.tif: --labels-suffix _labels)",
    )
    pr.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep the rows of CSV.partial (needs --csv, the "
        "same model) and classify only the pages not in it",
    )
    _add_predict_options(
        pr,
        ("tta", "engine", "precision"),
        tta_note="the unfamiliar score stays the unflipped page's",
    )
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser(
        "explain",
        help="where the model looks: Grad-CAM heatmaps as a TIFF",
        description="Grad-CAM of every page of IMAGE (or --page N): a float32 "
        "TIFF in [0, 1] with the image's pages, height and width (pages x Y x "
        "X for stacks), aligned with the image; 1 marks where the evidence "
        "for the class is strongest. Prints the predicted class per page.",
    )
    x.add_argument("model", help="the model folder")
    x.add_argument("image", help="an image file or stack")
    x.add_argument("--out", required=True, help="the TIFF to write, e.g. heatmap.tif")
    x.add_argument(
        "--class",
        dest="class_name",
        default=None,
        metavar="NAME",
        help="the class to explain (default: each page's predicted class)",
    )
    x.add_argument("--page", type=int, default=None, metavar="N", help="only this page (from 0)")
    x.set_defaults(func=cmd_explain)

    ln = sub.add_parser(
        "label-next",
        help="the unlabelled pages most worth labelling next",
        description="Classify the pages of PATHS and list the N the model is "
        "least sure about (pages unlike its training images first or last), "
        "leaving out pages already in its dataset. Label them (e.g. with "
        "napari's Annotate), then `microclf retrain MODEL`.",
    )
    ln.add_argument("model", help="the model folder")
    ln.add_argument("paths", nargs="+", help="unlabelled images, stacks or folders")
    ln.add_argument("--top", type=int, default=20, help="how many pages (20)")
    ln.add_argument(
        "--by",
        choices=("margin", "entropy"),
        default="margin",
        help="margin: the two likeliest classes are close; entropy: the "
        "probability is spread over all classes (margin)",
    )
    ln.add_argument(
        "--unfamiliar",
        choices=("first", "last"),
        default="first",
        help="where pages unlike the training images go (first)",
    )
    ln.add_argument("--data", help="the dataset whose pages are left out (default: the model's)")
    ln.add_argument(
        "--labels",
        metavar="LABELS",
        help="a model of objects: the one image's label image; its objects are ranked",
    )
    ln.add_argument(
        "--labels-suffix",
        metavar="SUFFIX",
        help="a model of objects: each image with the label file named after it plus SUFFIX",
    )
    ln.add_argument("--csv", help="also write the list to this CSV file")
    ln.set_defaults(func=cmd_label_next)

    rt = sub.add_parser(
        "retrain",
        help="train a model folder again with its own settings",
        description="Train MODEL again with the settings it was trained with, "
        "on its dataset as it is now (new labels, moved files); a frozen base "
        "reuses the feature cache. Then the old model (now in previous/) and "
        "the new one are scored on the old model's test list, and both "
        "accuracies printed.",
    )
    rt.add_argument("model", help="the model folder")
    rt.set_defaults(func=cmd_retrain)

    r = sub.add_parser(
        "restore",
        help="bring back the model a retraining replaced",
        description="Make MODEL/previous/ (the model before the last training "
        "into MODEL) the active model again; the current one becomes previous/, "
        "so restoring twice switches back. Other files in MODEL stay.",
    )
    r.add_argument("model", help="the model folder")
    r.set_defaults(func=cmd_restore)

    rp = sub.add_parser(
        "report",
        help="write the model's HTML report again (report.html)",
        description="Write MODEL's report as one self-contained HTML file "
        "(set-up, data and split, curves, test metrics, confusion matrix, "
        "misclassified thumbnails, diagnosis) from its own files, without "
        "retraining. Every training writes MODEL/report.html too.",
    )
    rp.add_argument("model", help="the model folder")
    rp.add_argument("--out", help="the file to write (default: MODEL/report.html)")
    rp.set_defaults(func=cmd_report)

    from .core.export import FORMAT_HELP, FORMATS

    ex = sub.add_parser(
        "export",
        help="export a model for bioimage.io, TensorFlow, ONNX, or as one zip",
        description="Export MODEL for use outside microclf: "
        + "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items())
        + ". See docs/export.md.",
    )
    ex.add_argument("model", help="the model folder")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument(
        "--out",
        help="the file (or SavedModel folder) to write; default: next to "
        "the model folder (MODEL-bioimageio.zip, MODEL-savedmodel/, MODEL.onnx, "
        "MODEL.zip)",
    )
    ex.add_argument(
        "--example",
        help="bioimageio: the image whose first page is the "
        "package's test input (default: the first of the model's test images)",
    )
    ex.add_argument(
        "--author",
        action="append",
        help="bioimageio: an author of the package (repeat for more; default: your login name)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=cmd_export)

    ob = sub.add_parser("objects", help="put segmented objects (cells) into a dataset")
    obs = ob.add_subparsers(dest="objects_command", required=True)
    oa = obs.add_parser(
        "add",
        help="put the objects of IMAGE, segmented by LABELS, into DATA's class folders",
        description="Each object (a label of LABELS) becomes an example: the square crop "
        "around it, cut as the dataset's crop settings say (recorded in DATA/objects.json by "
        "the first objects added). A model trained on DATA classifies the objects of other "
        "images: microclf predict MODEL IMAGE --labels LABELS.",
    )
    oa.add_argument("data", help="the dataset folder (one sub-folder per class)")
    oa.add_argument("image", help="the image (2D or a stack)")
    oa.add_argument("labels", help="its label image: one whole number per object, 0 background")
    which = oa.add_mutually_exclusive_group(required=True)
    which.add_argument("--class", dest="class_name", help="the class of the objects added")
    which.add_argument(
        "--table",
        help="a CSV with columns label and class (and page for a stack): each "
        "object's class; objects not in it are left out",
    )
    oa.add_argument("--ids", help="with --class: only these labels, e.g. 3,7,12")
    oa.add_argument(
        "--crop-size", choices=["object", "fixed"], default=None,
        help="object: the object's box plus --margin on each side (default); fixed: --context "
        "pixels whatever the object's size",
    )  # fmt: skip
    oa.add_argument(
        "--margin",
        type=float,
        default=None,
        help="context on each side, as a fraction of the object (0.25)",
    )
    oa.add_argument(
        "--context",
        type=int,
        default=None,
        help="with --crop-size fixed: the crop's side in pixels (64)",
    )
    oa.add_argument(
        "--mask", choices=["none", "others", "object"], default=None,
        help="none: the neighbourhood as it is (default); others: other objects set to 0; "
        "object: everything but the object set to 0",
    )  # fmt: skip
    oa.set_defaults(func=cmd_objects_add)

    s = sub.add_parser("sample", help="write the synthetic sample dataset and stack")
    s.add_argument("out")
    s.add_argument("--per-class", type=int, default=40)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--fields", type=int, default=4, help="fields of labelled cells (objects) to write (4)"
    )
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="headless end to end: sample, short training, prediction")
    d.add_argument("--out", default="microclf-demo")
    d.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="most epochs (default: train's, 200, early stopped)",
    )
    d.add_argument("--per-class", type=int, default=150)
    d.add_argument("--image-size", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


def _add_predict_options(
    parser: argparse.ArgumentParser, names: tuple[str, ...], tta_note: str = ""
) -> None:
    """One option per named PredictOptions setting, its default and help from the field
    (``tta_note``: what TTA means for this command, after the field's help)."""
    from .core.predict_options import PredictOptions

    for name in names:
        f = PredictOptions.__dataclass_fields__[name]
        flag = "--" + name.replace("_", "-")
        help = f.metadata["help"]
        if isinstance(f.default, bool):
            note = tta_note if name == "tta" else ""
            parser.add_argument(flag, action="store_true", help=f"{help}; {note}" if note else help)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(
            flag,
            type=None if choices else type(f.default),
            default=f.default,
            choices=choices,
            help=help,
        )


def _predict_options(args):
    """The PredictOptions of ``microclf predict``'s arguments."""
    from .core.predict_options import PredictOptions

    return PredictOptions(
        threshold=args.threshold,
        batch_size=args.batch_size,
        tta=args.tta,
        engine=args.engine,
        precision=args.precision,
    )


def _needs_tensorflow(args) -> bool:
    """Whether the command runs TensorFlow: prediction and evaluation on OpenVINO do not
    (a model without its own converted copy imports it later, to convert it once)."""
    if args.command in ("sample", "restore", "report"):
        return False
    if args.command == "export":
        return getattr(args, "format", None) != "zip"
    if args.command in ("predict", "evaluate"):
        from .core.engine import resolve_engine

        return resolve_engine(args.engine) != "openvino"
    return True


def _start_tensorflow_quietly() -> None:
    """Import TensorFlow and set up its devices without its C++ start-up lines."""
    from .core.device import stderr_muted

    with stderr_muted():
        import tensorflow as tf

        tf.config.list_logical_devices()


def _repair_model_folder(args) -> None:
    """Complete or clean up what a killed run left in the model folder, before anything."""
    folder = getattr(args, "model", None) or (
        getattr(args, "out", None) if args.command == "train" else None
    )
    if folder:
        from .core.bundle import repair_model_folder

        for line in repair_model_folder(folder):
            print(line, flush=True)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Our warnings as one line, like our errors; other packages' as Python writes them."""
    if "napari_microclf" in str(filename):
        return f"microclf: warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.formatwarning = _warning_line
    args = build_parser().parse_args(argv)
    try:
        _repair_model_folder(args)
        # refuse wrong settings, folders and destinations before TensorFlow starts
        if args.command == "train":
            args.config = _train_config_checked(args)
        elif args.command == "features":
            args.config = _features_config_checked(args)
        elif args.command == "predict":
            args.checked = _predict_checked(args)
        elif args.command == "explain":
            args.checked = _explain_checked(args)
        elif args.command == "export":
            args.checked = _export_checked(args)
        if _needs_tensorflow(args) and not args.debug:
            _start_tensorflow_quietly()
        return args.func(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        return _report_error(exc)


def _report_error(exc: BaseException) -> int:
    """Ours and the environment's errors (disk full, permission denied) in one line; anything
    else is a bug: its traceback, and where to report it."""
    import traceback

    from .core.preflight import user_message

    text = user_message(exc)
    if text is None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        text = (
            f"unexpected {type(exc).__name__}: {exc} -- a bug in microclf; please report "
            "it with the traceback above"
        )
    print(f"microclf: error: {text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
