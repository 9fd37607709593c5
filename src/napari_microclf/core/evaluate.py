"""Test-set evaluation: a saved model scored on its own test list, or on new labelled images.

The report (accuracy, per-class precision/recall/F1, the confusion matrix, the misclassified
files and the diagnosis) is :mod:`.report`'s, which training uses for the report it stores
in the bundle; the pages are run by the :class:`~.predictor.Predictor`'s engine
(:func:`~.tta.model_probabilities`).

:func:`evaluate` scores a model on *its own* test list (stored in the bundle's
``split.json`` with each file's content hash when it was trained), so a later resplit or a
renamed class folder cannot put its training images into the score; ``all_images=True``
scores every image of a labelled folder that the model never saw (the guide's "test on new
data"). Each evaluation writes a new, dated report into the model's ``reports/`` folder and
never overwrites the training report.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .bundle import load_bundle, own_split
from .dataset import DatasetError, class_files, list_classes, load_split
from .engine import check_precision, engine_label, resolve_engine
from .files import atomic_write_text, file_digest
from .images import PageRef, count_pages
from .predict_options import DEFAULTS
from .predictor import Predictor
from .report import classification_report, describe_model, diagnose, report_files, tta_summary
from .tta import model_probabilities

REPORTS_DIR = "reports"
SUBSETS = ("test", "val", "train")


def _index_by_hash(data_dir: Path, classes: list[str]) -> dict[str, Path]:
    return {file_digest(p): p for c in classes for p in class_files(data_dir, c)}


def evaluate(
    bundle_path: str | Path,
    data_dir: str | Path | None = None,
    subset: str = "test",
    all_images: bool = False,
    batch_size: int = DEFAULTS.batch_size,
    save: bool = True,
    lists_from: str | Path | None = None,
    tta: bool = DEFAULTS.tta,
    engine: str | None = DEFAULTS.engine,
    precision: str | None = DEFAULTS.precision,
) -> dict:
    """Score a model on its own ``subset`` (by default its test list), or on every image of a
    labelled folder it never saw (``all_images``).

    Parameters
    ----------
    bundle_path : path
        The model folder.
    data_dir : path, optional
        The class-folder dataset; default: the one the model was trained on.
    subset : {"test", "val", "train"}
        Which of the model's own lists to score (files found by their recorded name, or by
        content if they moved; missing and changed files are listed, not scored).
    all_images : bool
        Score every image of ``data_dir`` whose content is not in the model's training or
        validation lists (those are listed as flagged, not scored).
    save : bool
        Write ``reports/<date>-<subset>.md`` and ``.json`` into the model folder (for a
        zipped model: into ``<name>-reports/reports/`` beside the zip).
    lists_from : path, optional
        Take the ``subset`` list from this other model folder instead (e.g. the ``previous/``
        model, to score a retrained model on exactly the images its predecessor was scored on).
    tta : bool
        Test-time augmentation: score each page by the mean of the model's probabilities on
        the page and its horizontal, vertical and double flips (about four times the
        compute). The report's accuracy and metrics are then those of the averaged
        probabilities; its title and notes say so, and ``report["tta"]`` holds
        ``{"accuracy", "plain_accuracy", "n", "views", "in_metrics": True}`` (the plain
        accuracy is the unflipped views', computed in the same pass).
    engine : {"auto", "openvino", "tensorflow"}, optional
        What runs the model (:mod:`.engine`; fp32 either way, equal within 1e-4).
    precision : {"f32", "bf16", "int8"}, optional
        On OpenVINO: score a fast prediction mode, to see what it costs on this model.

    Returns
    -------
    dict
        The report (see :func:`~.report.classification_report`) with ``title``, ``data``,
        ``notes``, ``missing``, ``changed``, ``flagged`` and, when saved, ``saved``.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    engine = resolve_engine(engine)
    precision = check_precision(precision, engine)
    bundle = load_bundle(bundle_path, lazy=engine == "openvino")
    names = bundle.class_names
    data_dir = Path(data_dir if data_dir is not None else bundle.meta.get("data_dir", ""))
    if not data_dir.is_dir():
        raise DatasetError(
            f"dataset folder {data_dir} does not exist; pass the labelled folder to evaluate on"
        )
    classes = list_classes(data_dir)
    own = own_split(lists_from if lists_from is not None else bundle.path)
    if lists_from is not None and own is None:
        raise DatasetError(f"{lists_from} stores no split lists to score on")
    notes, missing, changed, flagged, files = [], [], [], [], []  # files: (path, class)
    if all_images:
        label = "all images the model never saw"
        if own is None:
            notes.append(
                "This model predates stored split lists: images it trained on cannot "
                "be recognised and are scored too."
            )
        seen = {e["sha1"]: s for s in ("train", "val") for e in (own or {}).get(s, [])}
        for c in classes:
            if c not in names:
                notes.append(
                    f"Folder {c!r} is not a class of the model ({', '.join(names)}): skipped."
                )
                continue
            for p in class_files(data_dir, c):
                s = seen.get(file_digest(p))
                if s:
                    flagged.append(f"{c}/{p.name} (in the model's {s} list)")
                else:
                    files.append((p, c))
    elif own is not None:
        label = (
            f"its own {subset} list"
            if lists_from is None
            else f"the {subset} list of {Path(lists_from).name}"
        )
        by_hash = None
        for e in own[subset]:
            path = data_dir / e["key"]
            if path.is_file() and file_digest(path) == e["sha1"]:
                files.append((path, path.parent.name))
                continue
            if by_hash is None:  # moved or renamed since: look the content up
                by_hash = _index_by_hash(data_dir, classes)
            if e["sha1"] in by_hash:
                p = by_hash[e["sha1"]]
                files.append((p, p.parent.name))
            elif path.is_file():
                changed.append(e["key"])
            else:
                missing.append(e["key"])
        for p, c in [f for f in files if f[1] not in names]:
            notes.append(f"{c}/{p.name}: class {c!r} is not one the model knows; skipped.")
        files = [f for f in files if f[1] in names]
    else:
        label = f"the dataset's current {subset} split"
        notes.append(
            "This model predates stored split lists: scored on the dataset's current "
            "split.json, which may differ from the one it was trained with."
        )
        split = load_split(data_dir)
        if split is None:
            raise DatasetError(
                f"{data_dir} has no split.json and the model stores no split: "
                "pass the dataset the model was trained on"
            )
        for key in split.files(subset):
            cls = key.split("/", 1)[0]
            if cls not in names:
                raise DatasetError(
                    f"class {cls!r} in {data_dir} is not one the model knows "
                    f"({names}); evaluate on the dataset it was trained on"
                )
            if (data_dir / key).exists():
                files.append((data_dir / key, cls))
    refs = [PageRef(p, i, names.index(c)) for p, c in files for i in range(count_pages(p))]
    if not refs:
        why = "; ".join(
            [f"{len(flagged)} image(s) were seen in training or validation"] * bool(flagged)
            + [f"{len(missing) + len(changed)} listed image(s) are missing or changed"]
            * bool(missing or changed)
            + notes
        )
        raise DatasetError(
            f"nothing to score in {data_dir} on {label}"
            + (f" ({why})" if why else "")
            + ": add labelled images the model never saw, in folders named like its classes "
            f"({', '.join(names)})"
        )
    probs, plain = _probabilities(bundle, refs, batch_size, tta, engine, precision)
    report = classification_report([r.label for r in refs], probs, names, refs)
    report.update(
        subset="all" if all_images else subset,
        data=str(data_dir.resolve()),
        model=describe_model(bundle.meta),
        notes=notes,
        missing=missing,
        changed=changed,
        flagged=flagged,
        title=f"Evaluation of {bundle.path.name} on {label}" + (" with flips (TTA)" if tta else ""),
        engine=engine_label(engine, precision),
    )
    if tta:
        report["tta"] = tta_summary(
            report["accuracy"], [r.label for r in refs], plain, in_metrics=True
        )
        notes.append(
            "Test-time augmentation: each page is scored by the mean of the model's "
            "probabilities on the page and its horizontal, vertical and double "
            "flips; the accuracy and every metric here are those of the mean."
        )
    if own is not None and not all_images:
        groups = {e.get("group") for e in own[subset] if e.get("group") is not None}
        report["groups"] = len(groups) or None
    if missing or changed:
        notes.append(
            f"{len(missing)} image(s) of the list are missing and {len(changed)} "
            "changed since training: not scored."
        )
    if flagged:
        notes.append(f"{len(flagged)} image(s) were seen in training or validation: not scored.")
    report["diagnosis"] = diagnose({}, report)
    if save:
        report["saved"] = str(save_report(reports_home(bundle), report))
    return report


def reports_home(bundle) -> Path:
    """Where an evaluation of ``bundle`` keeps its ``reports/``: the model folder, or for a
    zipped model (read from a cache folder) ``<name>-reports/`` beside the zip, where its
    user finds them."""
    if getattr(bundle, "source", None) is None:
        return Path(bundle.path)
    return bundle.source.with_name(f"{bundle.source.stem}-reports")


def _probabilities(
    bundle,
    refs,
    batch_size: int,
    tta: bool = False,
    engine: str = "tensorflow",
    precision: str = "f32",
):
    """``(probabilities, plain)`` of ``refs``, read and run in chunks (memory bounded by a
    chunk); with ``tta`` the probabilities are the mean over each page's four flipped views
    and ``plain`` the unflipped views' own, else both are the plain ones. ``engine``:
    ``"openvino"`` runs the bundle's converted model (see :class:`~.predictor.Predictor`)."""
    forward = None
    if engine == "openvino":
        predictor = Predictor(bundle, batch_size, engine="openvino", precision=precision)
        forward = predictor._openvino_forward()
    return model_probabilities(
        bundle.model if forward is None else None,
        bundle.preprocess,
        refs,
        batch_size,
        tta,
        forward,
    )


def save_report(model_dir: str | Path, report: dict) -> Path:
    """Write ``reports/<date>-<subset>.md`` and ``.json`` (a new name each time)."""
    folder = Path(model_dir) / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{_dt.datetime.now():%Y-%m-%d-%H%M%S}-{report.get('subset', 'test')}"
    n = 1
    while (folder / f"{stem}.md").exists() or (folder / f"{stem}.json").exists():
        n += 1
        stem = f"{stem.rsplit('~', 1)[0]}~{n}"
    for name, text in report_files(report, stem).items():
        atomic_write_text(folder / name, text)
    return folder / f"{stem}.md"
