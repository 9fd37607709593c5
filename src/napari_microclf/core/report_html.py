"""The model's report as one self-contained HTML file (``report.html`` in the model folder).

Every training writes it into the bundle (one of the bundle's own files, so a retraining
moves it into ``previous/`` with the model it describes), and ``microclf report MODEL``
writes it again from ``microclf.json``, ``report.json`` and ``split.json`` without
retraining (:func:`write_report_html`). It holds the set-up (backbone, weights and their
hash, every setting), class counts and weights, the split with its groups, the training
curves, the test metrics, the confusion matrix, thumbnails of the misclassified test images
(and of unfamiliar ones where the report lists them), the plain-words diagnosis and the
versions. It opens offline: no external style sheet, script, font or image; the curves and
thumbnails are PNGs embedded as ``data:`` URIs, and every string from the data (class and file
names come from folders) is HTML-escaped.

Unfamiliar test images are shown when ``report.json`` has an ``"unfamiliar"`` list of
``{"file", "page", "score"}`` entries (``"true"``, ``"predicted"``, ``"confidence"`` where
known), with the threshold in ``report["unfamiliar_threshold"]`` or
``meta["familiarity"]["threshold"]``; without such a list the section is left out.

Examples
--------
>>> from napari_microclf.core.report_html import write_report_html
>>> write_report_html("microclf-model")  # doctest: +SKIP
PosixPath('.../microclf-model/report.html')
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from html import escape
from pathlib import Path

import numpy as np

from .bundle import own_split, read_meta
from .errors import BundleError, ImageReadError
from .files import atomic_write_text
from .images import PreprocessSpec, preprocess, read_page
from .lock import model_lock
from .report import REPORT_JSON, describe_model, diagnose
from .train_config import TrainConfig

REPORT_HTML = "report.html"
THUMB_SIZE = 112  # pixels of a thumbnail's side
MAX_THUMBS = 60  # thumbnails per section; the rest are listed by name


def e(value) -> str:
    """HTML-escaped text of any value (quotes too: safe in attributes)."""
    return escape(str(value), quote=True)


def _plain(obj):
    """``obj`` as JSON would give it back (tuples as lists, numpy scalars as numbers), so the
    report written by a training and the one rewritten from the bundle's files are alike."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.loads(json.dumps(obj, default=default))


# -- pictures -------------------------------------------------------------------------------


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


CURVE_LABELS = {"val_macro_f1": "validation macro-F1"}


def curves_png(history: dict) -> bytes | None:
    """Loss, accuracy and learning rate per epoch (training and validation), fine-tuning's
    phase 2 marked by a dashed line; a PNG drawn with matplotlib's Agg ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss = history.get("loss") or []
    if not loss:
        return None
    epochs = np.arange(1, len(loss) + 1)
    phases = history.get("phase") or []
    phase2 = next((i + 1 for i, p in enumerate(phases) if p == 2), None)
    fig = Figure(figsize=(10.5, 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("loss", "Loss", ("loss", "val_loss")),
        (
            "accuracy",
            "Accuracy and validation macro-F1",
            ("accuracy", "val_accuracy", "val_macro_f1"),
        ),
        ("lr", "Learning rate", ("lr",)),
    )
    for ax, (_key, title, keys) in zip(fig.subplots(1, 3), panels, strict=True):
        for key, colour in zip(keys, ("#1f77b4", "#ff7f0e", "#2ca02c"), strict=False):
            values = history.get(key) or []
            if values:
                label = CURVE_LABELS.get(
                    key, "validation" if key.startswith("val_") else "training"
                )
                ax.plot(
                    epochs[: len(values)],
                    values,
                    marker="o",
                    ms=3,
                    color=colour,
                    label=label if key != "lr" else None,
                )
        if keys[0] == "lr" and any(v > 0 for v in history.get("lr") or []):
            ax.set_yscale("log")
        if keys[0] == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if phase2 is not None:
            ax.axvline(
                phase2 - 0.5,
                color="#555",
                ls="--",
                lw=1,
                label="fine-tuning starts" if keys[0] == "loss" else None,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        if keys[0] != "lr":
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        if keys[0] != "lr" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _find_file(path: str, data_dir: str | None) -> Path | None:
    """The recorded file, or the same ``<class>/<name>`` in the model's dataset folder (a
    report made from another working directory, or a dataset that moved)."""
    p = Path(path)
    if p.is_file():
        return p
    if data_dir:
        q = Path(data_dir) / p.parent.name / p.name
        if q.is_file():
            return q
    return None


def thumbnail_png(path: str | Path, page: int, spec) -> bytes:
    """One page as the model sees it (read and normalised by :mod:`.images`, so a 16-bit or
    12-bit image looks right), ``THUMB_SIZE`` pixels square, as PNG bytes."""
    from PIL import Image

    spec = dataclasses.replace(spec, image_size=THUMB_SIZE)
    rgb = preprocess(read_page(path, page), spec)
    img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _thumb_cards(entries: list[dict], spec, data_dir: str | None, caption) -> str:
    cards = []
    for m in entries[:MAX_THUMBS]:
        file = m.get("file")
        page = int(m.get("page") or 0)
        found = _find_file(file, data_dir) if file else None
        if found is None:
            pic = f"<div class='nothumb'>{'file not found' if file else 'no file recorded'}</div>"
        else:
            try:
                pic = f"<img src='{_png_uri(thumbnail_png(found, page, spec))}' alt=''>"
            except (ImageReadError, OSError, ValueError) as exc:
                pic = f"<div class='nothumb'>cannot read: {e(exc)}</div>"
        name = Path(file).name if file else "?"
        where = f"{name}" + (f" p{page}" if page else "")
        cards.append(
            f"<figure title='{e(file or '')} page {page}'>{pic}<figcaption>"
            f"{caption(m)}<span class='file'>{e(where)}</span></figcaption></figure>"
        )
    more = ""
    if len(entries) > MAX_THUMBS:
        rest = ", ".join(e(Path(m.get("file") or "?").name) for m in entries[MAX_THUMBS:])
        more = f"<p class='note'>{len(entries) - MAX_THUMBS} more: {rest}</p>"
    return f"<div class='thumbs'>{''.join(cards)}</div>{more}"


# -- tables ---------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join("-" if v is None else _fmt(v) for v in value)
    return str(value)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table from already-escaped cells."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _settings(config: dict) -> str:
    fields = TrainConfig.__dataclass_fields__
    rows, changed_list = [], []
    for key, value in config.items():
        f = fields.get(key)
        default = (
            _plain(f.default) if f is not None and f.default is not dataclasses.MISSING else None
        )
        changed = f is not None and key != "data_dir" and key != "out_dir" and value != default
        help_text = (f.metadata.get("help", "") if f is not None else "").replace("%%", "%")
        cell = f"<b>{e(_fmt(value))}</b>" if changed else e(_fmt(value))
        if changed:
            changed_list.append(f"<code>{e(key)}</code> {e(_fmt(value))}")
        rows.append([f"<code>{e(key)}</code>", cell, f"<span class='help'>{e(help_text)}</span>"])
    summary = (
        "Changed from the defaults: " + ", ".join(changed_list)
        if changed_list
        else "Every setting at its default."
    )
    return (
        f"<p>{summary}</p><details><summary>All {len(rows)} settings</summary>"
        + _table(["setting", "value", "meaning"], rows, "settings")
        + "<p class='note'>Values in bold differ from the defaults.</p></details>"
    )


def _split_counts(split: dict | None, names: list[str]):
    """Per class and subset: files and groups; per subset: groups (a group counted once)."""
    files = {c: dict.fromkeys(("train", "val", "test"), 0) for c in names}
    groups = {c: {s: set() for s in ("train", "val", "test")} for c in names}
    total = {s: set() for s in ("train", "val", "test")}
    for subset in ("train", "val", "test"):
        for entry in (split or {}).get(subset, []):
            cls = str(entry.get("key", "")).split("/", 1)[0]
            files.setdefault(cls, dict.fromkeys(("train", "val", "test"), 0))
            groups.setdefault(cls, {s: set() for s in ("train", "val", "test")})
            files[cls][subset] += 1
            group = entry.get("group", entry.get("key"))
            groups[cls][subset].add(group)
            total[subset].add(group)
    return files, groups, total


def _confusion(report: dict) -> str:
    names = report["class_names"]
    cm = report["confusion_matrix"]
    head = (
        "<tr><th class='corner'>true \u2193 / predicted \u2192</th>"
        + "".join(f"<th>{e(n)}</th>" for n in names)
        + "<th>total</th></tr>"
    )
    rows = []
    for i, row in enumerate(cm):
        total = sum(row)
        cells = []
        for j, v in enumerate(row):
            share = v / total if total else 0.0
            colour = "40,150,70" if i == j else "210,60,50"
            style = f"background:rgba({colour},{0.08 + 0.7 * share:.2f})" if v else ""
            cells.append(
                f"<td class='{'diag' if i == j else 'off'}' style='{style}' "
                f"title='true {e(names[i])}, predicted {e(names[j])}'>{v}</td>"
            )
        rows.append(f"<tr><th>{e(names[i])}</th>{''.join(cells)}<td class='tot'>{total}</td></tr>")
    col_totals = [sum(r[j] for r in cm) for j in range(len(names))]
    rows.append(
        "<tr><th>total</th>"
        + "".join(f"<td class='tot'>{v}</td>" for v in col_totals)
        + f"<td class='tot'>{sum(col_totals)}</td></tr>"
    )
    return f"<table class='cm'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


# -- the page -------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0;color:#1d2330;background:#f4f5f7;line-height:1.4;font-size:14px}
main{max-width:1120px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;
 border-bottom:2px solid #e3e6ec}h3{font-size:14px;margin:14px 0 6px}
.sub{color:#5b6475;margin:0 0 14px}.note{color:#5b6475;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #dde1e8;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #dde1e8;padding:4px 9px;text-align:center;vertical-align:top}
th{background:#f0f2f6;font-weight:600}td:first-child,th:first-child{text-align:left}
table.settings td{text-align:left}.help{color:#5b6475;font-size:12px}
table.cm td{min-width:54px;font-variant-numeric:tabular-nums;font-size:14px}
table.cm td.diag{font-weight:700}table.cm td.tot{color:#5b6475;background:#fafbfc}
th.corner{font-weight:400;color:#5b6475;font-size:12px}
img.curves{max-width:100%;border:1px solid #e3e6ec}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:124px;border:1px solid #dde1e8;border-radius:4px;padding:5px;
 font-size:11px;background:#fafbfc}
figure img,.nothumb{width:112px;height:112px;display:block;image-rendering:auto;background:#000}
.nothumb{color:#ddd;font-size:11px;display:flex;align-items:center;justify-content:center;
 text-align:center}
figcaption{margin-top:4px;overflow-wrap:break-word}
figcaption .file{display:block;color:#5b6475;word-break:break-all}
details summary{cursor:pointer;color:#2a5db0;margin:4px 0}
.t{color:#1f6f3a}.p{color:#b0322a}
ul.diag li{margin-bottom:6px}.good{color:#1f6f3a}.warn{color:#b0322a}
code{font-size:12px}dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;
 margin:6px 0}dt{color:#5b6475}dd{margin:0;word-break:break-all}
"""


def _dl(pairs: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def render_report_html(
    meta: dict, report: dict | None, split: dict | None = None, title: str | None = None
) -> str:
    """The report page from the bundle's metadata (``microclf.json``), its test report
    (``report.json``) and its own split (``split.json``); returns the HTML text (ASCII,
    non-ASCII characters as character references).

    Parameters
    ----------
    meta : dict
        The bundle's metadata, as :func:`~.train.train` writes it.
    report : dict, optional
        The test report (:func:`~.report.classification_report` plus ``diagnosis``).
    split : dict, optional
        ``{subset: [{"key", "sha1", "group"}, ...]}``, the model's own split.
    title : str, optional
        The heading; default: the model folder's name from the report's title.
    """
    meta, report, split = _plain(meta), _plain(report or {}), _plain(split)
    names = list(meta.get("class_names") or report.get("class_names") or [])
    config = meta.get("config") or {}
    history = meta.get("history") or {}
    heading = title or report.get("title") or "microclf model report"
    parts = [
        f"<h1>{e(heading)}</h1>",
        f"<p class='sub'>Trained {e(meta.get('date', '?'))} on "
        f"<code>{e(meta.get('data_dir', '?'))}</code></p>",
    ]

    # summary cards
    acc = report.get("accuracy")
    groups = report.get("groups")
    cards = [
        (f"{acc:.1%}" if acc is not None else "-", "test accuracy"),
        *(
            [
                (f"{report['balanced_accuracy']:.1%}", "balanced accuracy"),
                (f"{report['macro_f1']:.2f}", "macro-F1"),
            ]
            if report.get("balanced_accuracy") is not None
            else []
        ),
        (str(report.get("n", 0)), "test images" + (f" from {groups} groups" if groups else "")),
        (str(len(names)), "classes"),
        (str(meta.get("epochs_run", len(history.get("loss") or []))), "epochs run"),
        (str(meta.get("backbone", "?")), "backbone"),
    ]
    parts.append(
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{e(v)}</b><span>{e(k)}</span></div>" for v, k in cards)
        + "</div>"
    )

    # set-up
    parts.append("<h2>Set-up</h2>")
    pre = meta.get("preprocessing") or {}
    parts.append(
        _dl(
            [
                ("model", e(describe_model(meta))),
                ("backbone", e(meta.get("backbone", "?"))),
                ("weights", e(meta.get("weights", "?"))),
                ("weights id (hash)", f"<code>{e(meta.get('weights_id', '?'))}</code>"),
                ("input", e(" x ".join(str(v) for v in meta.get("input_size", [])))),
                ("preprocessing", e(", ".join(f"{k} {_fmt(v)}" for k, v in pre.items()))),
                ("cached features", e(_fmt(meta.get("cached_features")))),
            ]
            + _familiarity(meta)
        )
    )
    phases = meta.get("phases") or []
    if phases:
        rows = []
        for p in phases:
            first, last = (p.get("epochs") or [None, None])[:2]
            early = p.get("early_stopped")
            rows.append(
                [
                    e(p.get("phase")),
                    e(f"{first}-{last}"),
                    e(f"{p.get('learning_rate', 0):.1e}"),
                    e(p.get("trained", "")),
                    e(f"after epoch {early['after_epoch']}, kept epoch {early['best_epoch']}")
                    if early
                    else "-",
                ]
            )
        parts.append(
            "<h3>Phases</h3>"
            + _table(["phase", "epochs", "learning rate", "trained", "early stopping"], rows)
        )
    if config:
        parts.append("<h3>Settings</h3>" + _settings(config))

    # data
    parts.append("<h2>Data: classes and split</h2>")
    dist = meta.get("class_distribution") or {}
    weights = meta.get("class_weights") or {}
    files, grp, total = _split_counts(split, names)
    rows = []
    for c in names:
        w = weights.get(c)
        rows.append(
            [e(c), e(dist.get(c, "-")), e(f"{w:.2f}" if w is not None else "-")]
            + [
                f"{files[c][s]} <span class='note'>({len(grp[c][s])})</span>"
                for s in ("train", "val", "test")
            ]
        )
    if split:
        rows.append(
            ["<b>all</b>", e(sum(dist.values()) if dist else "-"), ""]
            + [
                f"{sum(files[c][s] for c in files)} <span class='note'>({len(total[s])})</span>"
                for s in ("train", "val", "test")
            ]
        )
    parts.append(
        _table(
            [
                "class",
                "training images",
                "class weight",
                "train files (groups)",
                "validation files (groups)",
                "test files (groups)",
            ],
            rows,
        )
    )
    sp = meta.get("split") or {}
    how = [
        f"seed {sp.get('seed', '?')}",
        f"validation {_fmt(sp.get('val_fraction'))}",
        f"test {_fmt(sp.get('test_fraction'))}",
        "groups by " + (f"pattern {sp['group_by']!r}" if sp.get("group_by") else "source file"),
    ]
    parts.append(
        f"<p class='note'>Training images count pages (class weights: "
        f"{'balanced' if weights else 'off'}). Split: {e(', '.join(how))}; images of a "
        "group stay in one subset, so the test set measures sources never seen."
        + ("" if split else " The model's own split list is missing.")
        + "</p>"
    )

    # curves
    png = curves_png(history)
    if png is not None:
        parts.append("<h2>Training curves</h2>")
        parts.append(
            f"<img class='curves' src='{_png_uri(png)}' alt='loss, accuracy and "
            "learning rate per epoch'>"
        )

    # test metrics
    parts.append("<h2>Test set</h2>")
    if report.get("n"):
        parts.append(
            f"<p>Accuracy <b>{acc:.2%}</b> on {report['n']} images"
            + (f" from {groups} groups" if groups else "")
            + ", never seen in training.</p>"
            + _tta_line(report.get("tta"))
        )
        rows = [
            [
                e(c["class"]),
                f"{c['precision']:.2f}",
                f"{c['recall']:.2f}",
                f"{c['f1']:.2f}",
                e(c["support"]),
            ]
            for c in report.get("per_class", [])
        ]
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows))
        parts.append("<h3>Confusion matrix</h3>" + _confusion(report))
        parts.append(
            "<p class='note'>Rows: true class; columns: predicted. Shading: share of the row.</p>"
        )
    else:
        parts.append(
            "<p>No test images: the test report is empty. Add images or raise the "
            "test fraction.</p>"
        )

    spec = _spec(meta)
    data_dir = meta.get("data_dir")
    mis = sorted(report.get("misclassified") or [], key=lambda m: -float(m.get("confidence") or 0))
    if report.get("n"):
        parts.append(f"<h2>Misclassified test images ({len(mis)})</h2>")
        if mis:
            parts.append(
                "<p class='note'>Most confident mistakes first: a confident mistake "
                "is often a wrong label.</p>"
            )
            parts.append(
                _thumb_cards(
                    mis,
                    spec,
                    data_dir,
                    lambda m: (
                        f"<span class='t'>true {e(m.get('true'))}</span><br><span class='p'>called "
                        f"{e(m.get('predicted'))}</span> {float(m.get('confidence') or 0):.2f}<br>"
                    ),
                )
            )
        else:
            parts.append("<p>None: every test image was classified right.</p>")

    unfamiliar = report.get("unfamiliar")
    if isinstance(unfamiliar, list) and (unfamiliar or report.get("n")):
        threshold = report.get(
            "unfamiliar_threshold", (meta.get("familiarity") or {}).get("threshold")
        )
        parts.append(f"<h2>Unfamiliar test images ({len(unfamiliar)})</h2>")
        parts.append(
            "<p class='note'>Images unlike the training data"
            + (f" (score above {float(threshold):.3g})" if threshold is not None else "")
            + ": the model's answer on them is a guess.</p>"
        )
        if unfamiliar:
            entries = sorted(
                (u for u in unfamiliar if isinstance(u, dict)),
                key=lambda u: -float(u.get("score") or 0),
            )
            parts.append(_thumb_cards(entries, spec, data_dir, _unfamiliar_caption))
        else:
            parts.append("<p>None.</p>")

    # diagnosis
    findings = report.get("diagnosis")
    if findings is None:
        findings = diagnose(history, report)
    if findings:
        items = "".join(
            f"<li><b class='{'good' if f.get('finding') == 'Good training run' else 'warn'}'>"
            f"{e(f.get('finding'))}</b>: {e(str(f.get('evidence', '')).rstrip('.'))}.<br>"
            f"<i>What to do:</i> {e(f.get('remedy'))}</li>"
            for f in findings
        )
        parts.append(f"<h2>Diagnosis</h2><ul class='diag'>{items}</ul>")
    notes = [n for key in ("notes",) for n in report.get(key) or []]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")

    versions = meta.get("versions") or {}
    parts.append(
        "<h2>Versions</h2>"
        + _dl(
            [(e(k), e(v)) for k, v in versions.items()]
            + [("bundle format", e(meta.get("format", "?")))]
        )
    )
    body = "\n".join(parts)
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{e(heading)}</title><style>{STYLE}</style></head>\n"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _tta_line(tta) -> str:
    """The test accuracy with flips (test-time augmentation) beside the plain one."""
    if not isinstance(tta, dict) or tta.get("accuracy") is None:
        return ""
    views = tta.get("views", 4)
    plain = tta.get("plain_accuracy")
    if tta.get("in_metrics"):  # the accuracy above is the TTA one
        return (
            f"<p class='note'>Scored with flips (test-time augmentation: the mean of "
            f"{e(views)} flipped views per image)"
            + (f"; without flips {float(plain):.2%}" if plain is not None else "")
            + ".</p>"
        )
    seconds = tta.get("seconds")
    return (
        f"<p>With flips (test-time augmentation: the mean of {e(views)} flipped views "
        f"per image) <b>{float(tta['accuracy']):.2%}</b>"
        + (f" <span class='note'>({float(seconds):.1f}s)</span>" if seconds is not None else "")
        + ".</p>"
    )


def _familiarity(meta: dict) -> list[tuple[str, str]]:
    """The unfamiliar-image check's line of the set-up, where the model has one."""
    fam = meta.get("familiarity")
    if not isinstance(fam, dict) or fam.get("threshold") is None:
        return []
    cal = fam.get("calibration") if isinstance(fam.get("calibration"), dict) else {}
    quantile = fam.get("quantile")
    how = (
        (
            f" ({float(quantile):.0%} of {cal.get('n', '?')} {cal.get('source', 'held-out')} "
            "images below it)"
        )
        if quantile is not None
        else ""
    )
    return [
        (
            "unfamiliar-image check",
            e(f"{fam.get('method', '?')} distance, threshold {float(fam['threshold']):.3g}{how}"),
        )
    ]


def _unfamiliar_caption(u: dict) -> str:
    bits = []
    if u.get("true") is not None:
        bits.append(f"<span class='t'>true {e(u['true'])}</span>")
    if u.get("predicted") is not None:
        conf = u.get("confidence")
        bits.append(
            f"<span class='p'>called {e(u['predicted'])}</span>"
            + (f" {float(conf):.2f}" if conf is not None else "")
        )
    if u.get("score") is not None:
        bits.append(f"score {float(u['score']):.3g}")
    return "<br>".join(bits) + "<br>"


def _spec(meta: dict):
    return PreprocessSpec.from_dict(meta.get("preprocessing") or {})


def report_html_for_bundle(bundle_path: str | Path) -> str:
    """The report page of a model folder, from its own files (no model is loaded)."""
    folder = Path(bundle_path).expanduser()
    meta = read_meta(folder)
    path = folder / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report = None
    except (ValueError, OSError) as exc:
        raise BundleError(
            f"{path} is corrupt ({exc}); retrain the model or restore the previous one"
        ) from exc
    return render_report_html(meta, report, own_split(folder))


def write_report_html(bundle_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report page of model folder ``bundle_path`` to ``out`` (default:
    ``bundle_path/report.html``), atomically; returns the file written."""
    folder = Path(bundle_path).expanduser()
    text = report_html_for_bundle(folder)
    target = Path(out).expanduser() if out is not None else folder / REPORT_HTML
    if target.is_dir():
        target = target / REPORT_HTML
    if out is None:
        with model_lock(folder, "microclf report"):
            atomic_write_text(target, text)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    return target.resolve()
