"""Test-set evaluation and a plain-words diagnosis of the training curves.

The report has accuracy, per-class precision/recall/F1, the confusion matrix (rows: true
class, columns: predicted), the misclassified files, and the diagnosis. Training stores it in
the bundle as ``report.json`` and ``report.md``, and as a page with curves and thumbnails in
``report.html`` (:mod:`.report_html`).

:func:`evaluate` scores a model on *its own* test list (stored in the bundle's
``split.json`` with each file's content hash when it was trained), so a later resplit or a
renamed class folder cannot put its training images into the score; ``all_images=True``
scores every image of a labelled folder that the model never saw (the guide's "test on new
data"). Each evaluation writes a new, dated report into the model's ``reports/`` folder and
never overwrites the training report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def classification_report(y_true, probs, class_names, refs=None) -> dict:
    """Metrics from true labels and predicted probabilities ``(N, n_classes)``."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(class_names))
    y_pred = probs.argmax(axis=1) if len(y_true) else np.zeros(0, int)
    k = len(class_names)
    cm = np.zeros((k, k), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[t, p] += 1
    per_class = []
    for i, name in enumerate(class_names):
        tp = cm[i, i]
        precision = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        recall = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(
            {
                "class": name,
                "precision": round(float(precision), 4),
                "recall": round(float(recall), 4),
                "f1": round(float(f1), 4),
                "support": int(cm[i, :].sum()),
            }
        )
    pages = []
    for j in range(len(y_true)):
        entry = {
            "true": class_names[y_true[j]],
            "predicted": class_names[y_pred[j]],
            "confidence": round(float(probs[j, y_pred[j]]), 4),
        }
        if refs is not None:
            entry.update(file=str(refs[j].path), page=int(refs[j].page))
        pages.append(entry)
    mis = [e for e in pages if e["true"] != e["predicted"]]
    return {
        "n": int(len(y_true)),
        "accuracy": round(float((y_pred == y_true).mean()), 4) if len(y_true) else None,
        "class_names": list(class_names),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "predicted_counts": np.bincount(y_pred, minlength=k).tolist(),
        "misclassified": mis,
        "pages": pages,  # every scored page: the cells of the confusion matrix, for review
    }


def diagnose(history: dict, report: dict | None = None) -> list[dict]:
    """Read the curves the way the training guide teaches; each finding has a remedy."""
    findings = []
    acc, val_acc = history.get("accuracy", []), history.get("val_accuracy", [])
    val_loss = history.get("val_loss", [])
    if report and report.get("n"):
        counts = np.asarray(report["predicted_counts"])
        truth = np.asarray([c["support"] for c in report["per_class"]])
        top = int(counts.argmax())
        if counts[top] >= 0.9 * counts.sum() and truth[top] < 0.7 * truth.sum():
            name = report["class_names"][top]
            findings.append(
                {
                    "finding": "Predicts (almost) only one class",
                    "evidence": f"{counts[top]} of {counts.sum()} test images were called "
                    f"{name!r}, which holds {truth[top]} of them.",
                    "remedy": "Add more examples of the minority classes and keep class weighting "
                    "on (the default).",
                }
            )
    if acc and val_acc:
        gap = acc[-1] - val_acc[-1]
        best = int(np.argmin(val_loss)) if val_loss else len(val_acc) - 1
        rising = len(val_loss) - 1 - best >= 2 and val_loss[-1] > 1.1 * min(val_loss)
        if gap > 0.15 or (gap > 0.05 and rising):
            findings.append(
                {
                    "finding": "Overfitting",
                    "evidence": f"training accuracy {acc[-1]:.2f} vs validation {val_acc[-1]:.2f}"
                    + (
                        f"; validation loss lowest at epoch {best + 1} then rising"
                        if rising
                        else ""
                    ),
                    "remedy": "More data augmentation, fewer epochs (or early stopping), more "
                    "dropout, more images.",
                }
            )
        if max(acc) < 0.7 and max(val_acc) < 0.7:
            findings.append(
                {
                    "finding": "Underfitting",
                    "evidence": f"best training accuracy {max(acc):.2f}, best validation "
                    f"accuracy {max(val_acc):.2f}",
                    "remedy": "More epochs, a higher learning rate, or unfreeze the top of the "
                    "base (fine-tuning); check that pretrained weights are used.",
                }
            )
        if len(val_acc) >= 3 and val_acc[-1] - max(val_acc[:-2]) > 0.02 and not findings:
            findings.append(
                {
                    "finding": "Still improving",
                    "evidence": f"validation accuracy rose to {val_acc[-1]:.2f} in the last epochs",
                    "remedy": "Train longer (20-30 epochs).",
                }
            )
    if report and report.get("accuracy") is not None and report["accuracy"] < 0.8:
        weak = [c["class"] for c in report["per_class"] if c["support"] and c["recall"] < 0.8]
        findings.append(
            {
                "finding": "Test accuracy below 80%",
                "evidence": f"test accuracy {report['accuracy']:.2f}"
                + (f"; classes recalled below 80%: {', '.join(weak)}" if weak else ""),
                "remedy": "Add more data for the classes with poor recall, then retrain.",
            }
        )
    if not findings and val_acc:
        findings.append(
            {
                "finding": "Good training run",
                "evidence": f"final validation accuracy {val_acc[-1]:.2f}, close to training "
                f"accuracy {acc[-1]:.2f}",
                "remedy": "Check it on completely new images; add data where errors remain.",
            }
        )
    return findings


def format_report_md(report: dict, title: str | None = None) -> str:
    names = report["class_names"]
    lines = [f"# {title or report.get('title') or 'microclf test report'}", ""]
    if report.get("model"):
        lines += [f"Model: {report['model']}  "]
    if report.get("data"):
        lines += [f"Data: {report['data']}  "]
    if not report.get("n"):
        lines += [
            "No images to score: the subset is empty. Add images or raise the test "
            "fraction to measure the model on unseen data.",
            "",
        ]
    else:
        groups = f" from {report['groups']} groups (sources)" if report.get("groups") else ""
        lines += [
            f"Images: {report['n']}{groups}  ",
            f"Accuracy: **{report['accuracy']:.2%}**" + _tta_md(report.get("tta")),
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['class']} | {c['precision']:.2f} | {c['recall']:.2f} | {c['f1']:.2f} | "
            f"{c['support']} |"
            for c in report["per_class"]
        ]
        lines += [
            "",
            "## Confusion matrix (rows: true, columns: predicted)",
            "",
            "| true \\ predicted | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        lines += [
            f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |"
            for i, row in enumerate(report["confusion_matrix"])
        ]
    for key, heading in (
        ("notes", "Notes"),
        ("flagged", "Excluded: seen in training"),
        ("missing", "Excluded: missing"),
        ("changed", "Excluded: changed since training"),
    ):
        if report.get(key):
            lines += ["", f"## {heading}", ""] + [f"- {x}" for x in report[key]]
    if report.get("diagnosis"):
        lines += ["", "## Diagnosis", ""]
    for f in report.get("diagnosis", []):
        lines.append(f"- **{f['finding']}**: {f['evidence']}. *What to do:* {f['remedy']}")
    if report.get("misclassified"):
        lines += [
            "",
            "## Misclassified",
            "",
            "| file | page | true | predicted | confidence |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {m.get('file', '')} | {m.get('page', '')} | {m['true']} | {m['predicted']} "
            f"| {m['confidence']:.2f} |"
            for m in report["misclassified"]
        ]
    return "\n".join(lines) + "\n"


def _tta_md(tta: dict | None) -> str:
    """The accuracy line's TTA part: how the accuracy above was scored and the other one."""
    if not tta or tta.get("accuracy") is None:
        return ""
    views = tta.get("views", 4)
    if tta.get("in_metrics"):
        return (
            f" with flips (TTA: mean of {views} flipped views per image; plain "
            f"{tta['plain_accuracy']:.2%})"
        )
    seconds = f"; {tta['seconds']:.1f}s" if tta.get("seconds") is not None else ""
    return (
        f"  \nAccuracy with flips (TTA: mean of {views} flipped views per image): "
        f"{tta['accuracy']:.2%}{seconds}"
    )


def report_files(report: dict, stem: str = "report") -> dict[str, str]:
    return {f"{stem}.json": json.dumps(report, indent=1), f"{stem}.md": format_report_md(report)}


def describe_model(meta: dict) -> str:
    """``efficientnet-lite0, ImageNet weights (imagenet-sha256-579344248a93), frozen base``."""
    backbone = meta.get("backbone", "efficientnet-b0")
    weights = meta.get("weights", "?")
    wid = meta.get("weights_id", "").split(":", 1)[-1]
    what = {"imagenet": "ImageNet weights", "none": "no pretrained weights"}.get(
        weights, f"weights from {weights}"
    )
    tune = meta.get("fine_tune", 0)
    tuned = (
        "frozen base"
        if not tune
        else ("whole network trained" if tune == -1 else f"top {tune} of 7 stages fine-tuned")
    )
    return f"{backbone}, {what}" + (f" ({wid[:28]})" if wid else "") + f", {tuned}"


REPORTS_DIR = "reports"
SUBSETS = ("test", "val", "train")


def own_split(bundle_path: str | Path) -> dict | None:
    """The model's own ``{subset: [{"key", "sha1", "group"}...]}`` (None: an older bundle)."""
    from .dataset import SPLIT_FILE

    path = Path(bundle_path) / SPLIT_FILE
    if not path.is_file():
        return None
    from .model import BundleError, check_split_schema

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BundleError(
            f"{path} is corrupt ({exc}); restore the previous model (microclf "
            f"restore {Path(bundle_path)}) or retrain"
        ) from exc
    return check_split_schema(d, path)


def _index_by_hash(data_dir: Path, classes: list[str]) -> dict[str, Path]:
    from .dataset import class_files
    from .features import file_digest

    return {file_digest(p): p for c in classes for p in class_files(data_dir, c)}


def evaluate(
    bundle_path: str | Path,
    data_dir: str | Path | None = None,
    subset: str = "test",
    all_images: bool = False,
    batch_size: int = 32,
    save: bool = True,
    lists_from: str | Path | None = None,
    tta: bool = False,
    engine: str | None = None,
    precision: str | None = None,
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
        The report (see :func:`classification_report`) with ``title``, ``data``,
        ``notes``, ``missing``, ``changed``, ``flagged`` and, when saved, ``saved``.
    """
    from .dataset import DatasetError, class_files, list_classes, load_split
    from .features import file_digest
    from .images import PageRef, count_pages
    from .model import load_bundle

    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    from .engine import check_precision, engine_label, resolve_engine

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


def tta_summary(
    accuracy: float | None, y_true, plain_probs, in_metrics: bool, seconds: float | None = None
) -> dict | None:
    """``report["tta"]``: the accuracy with flips next to the plain one (None: no images).

    ``in_metrics``: the report's accuracy and metrics are the TTA ones (``evaluate(tta=True)``)
    rather than the plain ones (the training report).
    """
    from .predict import TTA_VIEWS

    y_true = np.asarray(y_true, dtype=int)
    if accuracy is None or not len(y_true):
        return None
    plain = float((np.asarray(plain_probs).argmax(axis=1) == y_true).mean())
    out = {
        "accuracy": accuracy,
        "plain_accuracy": round(plain, 4),
        "n": int(len(y_true)),
        "views": TTA_VIEWS,
        "in_metrics": bool(in_metrics),
    }
    if seconds is not None:
        out["seconds"] = round(float(seconds), 2)
    return out


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
    ``"openvino"`` runs the bundle's converted model (see :class:`~.predict.Predictor`)."""
    forward = None
    if engine == "openvino":
        from .predict import Predictor

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


def model_probabilities(model, spec, refs, batch_size: int = 32, tta: bool = False, forward=None):
    """The full ``model``'s probabilities for the pages ``refs``, preprocessed with ``spec``
    and run in chunks of ``8 * batch_size`` pages: ``(probabilities, plain)``. With ``tta``
    each page's probabilities are the mean over its four flipped views
    (:func:`~.predict.tta_probabilities`) and ``plain`` the unflipped views' (same pass);
    without, both are the plain probabilities. ``forward``: the model as another engine runs
    it (:func:`~.engine.classifier_forward`), used instead of ``model``."""
    from .images import preprocess_refs
    from .predict import flip_views, mean_of_views, tta_probabilities, uses_eager

    if forward is not None:
        out, plain = [], []
        for i in range(0, len(refs), max(batch_size, 1)):
            x = preprocess_refs(refs[i : i + batch_size], spec)
            probs = forward(flip_views(x) if tta else x)[0]
            out.append(mean_of_views(probs) if tta else probs)
            plain.append(probs[: len(x)])
        if not out:
            k = forward(np.zeros((0, spec.image_size, spec.image_size, 3), np.float32))[0]
            return k, k
        return np.concatenate(out), np.concatenate(plain)

    empty = np.zeros((0, *model.output_shape[1:]), np.float32)
    out, plain = [empty], [empty]
    chunk = max(batch_size, 1) * 8
    eager = uses_eager(model, len(refs), batch_size)
    for i in range(0, len(refs), chunk):
        x = preprocess_refs(refs[i : i + chunk], spec)
        if tta:
            mean, unflipped = tta_probabilities(model, x, batch_size, with_plain=True, eager=eager)
            out.append(mean)
            plain.append(unflipped)
        else:
            out.append(model.predict(x, batch_size=batch_size, verbose=0))
            plain.append(out[-1])
    return np.concatenate(out), np.concatenate(plain)


def save_report(model_dir: str | Path, report: dict) -> Path:
    """Write ``reports/<date>-<subset>.md`` and ``.json`` (a new name each time)."""
    import datetime as _dt

    from .dataset import atomic_write_text

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
