"""The report of a scored set: metrics, the diagnosis of the training curves, Markdown.

:func:`classification_report` turns true labels and predicted probabilities into accuracy,
per-class precision/recall/F1, the confusion matrix (rows: true class, columns: predicted)
and the misclassified files; :func:`diagnose` reads the training curves (and the report) in
plain words; :func:`format_report_md` writes it all as Markdown. Training stores its report
in the bundle as :data:`REPORT_JSON` and :data:`REPORT_MD` (and as a page,
:mod:`.report_html`); an evaluation (:mod:`.evaluate`) writes a dated one into the model's
``reports/``. Both sides use this module; neither imports the other.
"""

from __future__ import annotations

import json

import numpy as np

from .metrics import balanced_accuracy, macro_f1
from .tta import TTA_VIEWS

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
        "balanced_accuracy": _rounded(balanced_accuracy(cm)),
        "macro_f1": _rounded(macro_f1(cm)),
        "class_names": list(class_names),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "predicted_counts": np.bincount(y_pred, minlength=k).tolist(),
        "misclassified": mis,
        "pages": pages,  # every scored page: the cells of the confusion matrix, for review
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def diagnose(history: dict, report: dict | None = None, kept: int | None = None) -> list[dict]:
    """Read the curves the way the training guide teaches; each finding has a remedy.

    ``kept``: the 1-based epoch whose weights the model kept (early stopping's best, which
    a fall of the loss under its ``min_delta`` does not move); else the last phase's lowest
    validation loss."""
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
                    "on ('sqrt', the default; 'balanced' weighs rare classes more).",
                }
            )
        bal = report.get("balanced_accuracy")
        if bal is not None and report["accuracy"] - bal > 0.15:
            findings.append(
                {
                    "finding": "Rare classes missed",
                    "evidence": f"test accuracy {report['accuracy']:.2f} but balanced accuracy "
                    f"{bal:.2f} (the mean recall of the classes): the large classes carry "
                    "the accuracy",
                    "remedy": "Add examples of the classes with poor recall; weigh rare classes "
                    "more (class weights 'balanced' instead of 'sqrt').",
                }
            )
    if acc and val_acc:
        # the kept weights are the best epoch's of the last phase (early stopping restores
        # them; fine-tuning's loss, label-smoothed, does not compare with the head's)
        phase = history.get("phase") or []
        start = phase.index(phase[-1]) if len(phase) == len(val_loss) and phase else 0
        best = start + int(np.argmin(val_loss[start:])) if val_loss else len(val_acc) - 1
        if kept is not None and 1 <= kept <= len(val_acc):
            best = kept - 1
        gap = acc[best] - val_acc[best]
        rising = len(val_loss) - 1 - best >= 2 and val_loss[-1] > 1.1 * min(val_loss)
        if gap > 0.15 or (gap > 0.05 and rising):
            findings.append(
                {
                    "finding": "Overfitting",
                    "evidence": f"training accuracy {acc[best]:.2f} vs validation "
                    f"{val_acc[best]:.2f} at the kept epoch {best + 1}"
                    + (
                        f"; validation loss lowest at epoch {best + 1} then rising"
                        if rising
                        else ""
                    ),
                    "remedy": "More data augmentation, more dropout, more images; keep early "
                    "stopping on (the default) so that the best epoch's weights are kept.",
                }
            )
        if max(acc) < 0.7 and max(val_acc) < 0.7:
            findings.append(
                {
                    "finding": "Underfitting",
                    "evidence": f"best training accuracy {max(acc):.2f}, best validation "
                    f"accuracy {max(val_acc):.2f}",
                    "remedy": "Check that pretrained weights are used and that the intensity "
                    "setting keeps what tells the classes apart; unfreeze the top of the base "
                    "(fine-tuning: --fine-tune 2, or --preset auto on over 1,000 images).",
                }
            )
        if len(val_acc) >= 3 and val_acc[-1] - max(val_acc[:-2]) > 0.02 and not findings:
            findings.append(
                {
                    "finding": "Still improving",
                    "evidence": f"validation accuracy rose to {val_acc[-1]:.2f} in the last epochs",
                    "remedy": "Train longer (raise the epochs; early stopping still ends the "
                    "training when it converges).",
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
    if not findings and val_acc and acc:
        findings.append(
            {
                "finding": "Good training run",
                "evidence": f"validation accuracy {val_acc[best]:.2f} at the kept epoch "
                f"{best + 1}, close to training accuracy {acc[best]:.2f}",
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
            f"Accuracy: **{report['accuracy']:.2%}**" + _tta_md(report.get("tta")) + "  ",
            *_balanced_md(report),
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


def _balanced_md(report: dict) -> list[str]:
    """The scores that give every class the same say (reports from before 0.9 lack them)."""
    if report.get("balanced_accuracy") is None:
        return []
    return [
        f"Balanced accuracy (mean recall of the classes): **{report['balanced_accuracy']:.2%}**"
        f" · macro-F1: **{report['macro_f1']:.2f}**"
    ]


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


def tta_summary(
    accuracy: float | None, y_true, plain_probs, in_metrics: bool, seconds: float | None = None
) -> dict | None:
    """``report["tta"]``: the accuracy with flips next to the plain one (None: no images).

    ``in_metrics``: the report's accuracy and metrics are the TTA ones (``evaluate(tta=True)``)
    rather than the plain ones (the training report).
    """
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
