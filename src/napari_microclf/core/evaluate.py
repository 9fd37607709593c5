"""Test-set evaluation and a plain-words diagnosis of the training curves.

The report has accuracy, per-class precision/recall/F1, the confusion matrix (rows: true
class, columns: predicted), the misclassified files, and the diagnosis. It is stored in the
bundle as ``report.json`` and ``report.md``.
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
        per_class.append({"class": name, "precision": round(float(precision), 4),
                          "recall": round(float(recall), 4), "f1": round(float(f1), 4),
                          "support": int(cm[i, :].sum())})
    mis = []
    for j in np.flatnonzero(y_pred != y_true):
        entry = {"true": class_names[y_true[j]], "predicted": class_names[y_pred[j]],
                 "confidence": round(float(probs[j, y_pred[j]]), 4)}
        if refs is not None:
            entry.update(file=str(refs[j].path), page=int(refs[j].page))
        mis.append(entry)
    return {
        "n": int(len(y_true)),
        "accuracy": round(float((y_pred == y_true).mean()), 4) if len(y_true) else None,
        "class_names": list(class_names),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "predicted_counts": np.bincount(y_pred, minlength=k).tolist(),
        "misclassified": mis,
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
            findings.append({
                "finding": "Predicts (almost) only one class",
                "evidence": f"{counts[top]} of {counts.sum()} test images were called "
                            f"{name!r}, which holds {truth[top]} of them.",
                "remedy": "Add more examples of the minority classes and keep class weighting "
                          "on (the default).",
            })
    if acc and val_acc:
        gap = acc[-1] - val_acc[-1]
        best = int(np.argmin(val_loss)) if val_loss else len(val_acc) - 1
        rising = len(val_loss) - 1 - best >= 2 and val_loss[-1] > 1.1 * min(val_loss)
        if gap > 0.15 or (gap > 0.05 and rising):
            findings.append({
                "finding": "Overfitting",
                "evidence": f"training accuracy {acc[-1]:.2f} vs validation {val_acc[-1]:.2f}"
                            + (f"; validation loss lowest at epoch {best + 1} then rising"
                               if rising else ""),
                "remedy": "More data augmentation, fewer epochs (or early stopping), more "
                          "dropout, more images.",
            })
        if max(acc) < 0.7 and max(val_acc) < 0.7:
            findings.append({
                "finding": "Underfitting",
                "evidence": f"best training accuracy {max(acc):.2f}, best validation "
                            f"accuracy {max(val_acc):.2f}",
                "remedy": "More epochs, a higher learning rate, or unfreeze the top of the "
                          "base (fine-tuning); check that pretrained weights are used.",
            })
        if len(val_acc) >= 3 and val_acc[-1] - max(val_acc[:-2]) > 0.02 and not findings:
            findings.append({
                "finding": "Still improving",
                "evidence": f"validation accuracy rose to {val_acc[-1]:.2f} in the last epochs",
                "remedy": "Train longer (20-30 epochs).",
            })
    if report and report.get("accuracy") is not None and report["accuracy"] < 0.8:
        weak = [c["class"] for c in report["per_class"] if c["support"] and c["recall"] < 0.8]
        findings.append({
            "finding": "Test accuracy below 80%",
            "evidence": f"test accuracy {report['accuracy']:.2f}"
                        + (f"; classes recalled below 80%: {', '.join(weak)}" if weak else ""),
            "remedy": "Add more data for the classes with poor recall, then retrain.",
        })
    if not findings and val_acc:
        findings.append({
            "finding": "Good training run",
            "evidence": f"final validation accuracy {val_acc[-1]:.2f}, close to training "
                        f"accuracy {acc[-1]:.2f}",
            "remedy": "Check it on completely new images; add data where errors remain.",
        })
    return findings


def format_report_md(report: dict, title: str = "microclf test report") -> str:
    names = report["class_names"]
    lines = [f"# {title}", ""]
    if not report.get("n"):
        lines += ["No test images: the test split is empty. Add images or raise the test "
                  "fraction to measure the model on unseen data.", ""]
    else:
        lines += [f"Test images: {report['n']}  ", f"Accuracy: **{report['accuracy']:.2%}**", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']:.2f} | {c['recall']:.2f} | {c['f1']:.2f} | "
                  f"{c['support']} |" for c in report["per_class"]]
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
                  "| true \\ predicted | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |"
                  for i, row in enumerate(report["confusion_matrix"])]
    lines += ["", "## Diagnosis", ""]
    for f in report.get("diagnosis", []):
        lines.append(f"- **{f['finding']}**: {f['evidence']}. *What to do:* {f['remedy']}")
    if report.get("misclassified"):
        lines += ["", "## Misclassified", "", "| file | page | true | predicted | confidence |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m.get('file', '')} | {m.get('page', '')} | {m['true']} | {m['predicted']} "
                  f"| {m['confidence']:.2f} |" for m in report["misclassified"]]
    return "\n".join(lines) + "\n"


def report_files(report: dict) -> dict[str, str]:
    return {REPORT_JSON: json.dumps(report, indent=1), REPORT_MD: format_report_md(report)}


def evaluate(bundle_path: str | Path, data_dir: str | Path, subset: str = "test",
             batch_size: int = 32, save: bool = True) -> dict:
    """Evaluate a bundle on the dataset's persisted ``subset`` and (re)write its report."""
    from .dataset import DatasetError, atomic_write_text, load_split
    from .images import PageRef, preprocess_refs
    from .model import load_bundle

    bundle = load_bundle(bundle_path)
    data_dir = Path(data_dir)
    split = load_split(data_dir)
    if split is None:
        raise DatasetError(f"{data_dir} has no split.json: train on it first so the test set "
                           "is fixed, or pass the dataset the model was trained on")
    names = bundle.class_names
    refs = []
    for key in split.files(subset):
        cls, _ = key.split("/", 1)
        if cls not in names:
            raise DatasetError(f"class {cls!r} in {data_dir} is not one the model knows "
                               f"({names}); evaluate on the dataset it was trained on")
        path = data_dir / key
        if path.exists():
            from .images import count_pages

            refs += [PageRef(path, i, names.index(cls)) for i in range(count_pages(path))]
    x = preprocess_refs(refs, bundle.preprocess)
    probs = bundle.model.predict(x, batch_size=batch_size, verbose=0) if len(refs) else \
        np.zeros((0, len(names)))
    report = classification_report([r.label for r in refs], probs, names, refs)
    report["subset"] = subset
    report["diagnosis"] = diagnose(bundle.meta.get("history", {}), report)
    if save:
        for name, text in report_files(report).items():
            atomic_write_text(bundle.path / name, text)
    return report
