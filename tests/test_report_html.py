"""The HTML report: written into the bundle by every training, self-contained, holding the
numbers of report.json, escaping class names, rewritten by ``microclf report`` without
retraining, and kept in previous/ with the model it describes."""

import io
import json
import re
import shutil
from html import escape

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_microclf.cli import main as cli_main
from napari_microclf.core.images import PreprocessSpec
from napari_microclf.core.report_html import (
    REPORT_HTML,
    render_report_html,
    report_html_for_bundle,
    thumbnail_png,
)
from napari_microclf.core.sample import make_image
from napari_microclf.core.train import TrainConfig, train

ODD = "<b>x"  # a class folder whose name is markup


def _dataset(root, seed=0):
    """Two classes, one named like markup, 16-bit TIFFs (thumbnails must normalise them)."""
    rng = np.random.default_rng(seed)
    for folder, kind in ((ODD, "round"), ("fragmented & co", "fragmented")):
        (root / folder).mkdir(parents=True)
        for i in range(12):
            img = (make_image(kind, rng, 40).astype(np.float32) * 16).astype(np.uint16)
            tifffile.imwrite(root / folder / f"{kind}{i:02d}.tif", img)
    return root


def _config(data, out, seed=0):
    return TrainConfig(
        str(data),
        str(out),
        epochs=1,
        batch_size=8,
        image_size=32,
        weights=None,
        fine_tune=0,
        augment=False,
        early_stopping=False,
        seed=seed,
        test_split=0.34,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    data = _dataset(root / "data")
    result = train(_config(data, root / "model"))
    return data, result.bundle


@pytest.fixture()
def model(trained, tmp_path):
    data, bundle = trained
    shutil.copytree(bundle, tmp_path / "model")
    return data, tmp_path / "model"


def _text(html: str) -> str:
    """The visible text, tags dropped and entities kept as written."""
    return re.sub(r"<[^>]+>", " ", html)


def test_training_writes_a_self_contained_report_into_the_bundle(trained):
    _, bundle = trained
    html = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    meta = json.loads((bundle / "microclf.json").read_text())
    assert REPORT_HTML in meta["files"]  # the bundle's own file: swapped with the model
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", html, re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert html.isascii()
    for section in (
        "Set-up",
        "Data: classes and split",
        "Training curves",
        "Test set",
        "Confusion matrix",
        "Diagnosis",
        "Versions",
    ):
        assert f">{section}" in html, section
    assert meta["weights_id"] in html and meta["versions"]["tensorflow"] in html


def test_the_report_holds_the_numbers_of_report_json(trained):
    _, bundle = trained
    html = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    report = json.loads((bundle / "report.json").read_text())
    assert report["n"] > 0
    assert f"Accuracy <b>{report['accuracy']:.2%}</b> on {report['n']} images" in html
    assert f"<b>{report['accuracy']:.1%}</b>" in html  # the summary card
    # the confusion matrix as a table, cell by cell, row by row
    table = re.search(r"<table class='cm'>(.*?)</table>", html, re.S).group(1)
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", table.split("</thead>")[1], re.S)
    names = report["class_names"]
    assert [r[0] for r in rows[: len(names)]] == [escape(n, quote=True) for n in names]
    for (_, cells), expected in zip(rows, report["confusion_matrix"], strict=False):
        values = [int(v) for v in re.findall(r"<td class='(?:diag|off)'[^>]*>(\d+)</td>", cells)]
        assert values == expected
    # per-class precision, recall, F1 and support in the metrics table
    for c in report["per_class"]:
        row = (
            f"<tr><td>{escape(c['class'], quote=True)}</td><td>{c['precision']:.2f}</td>"
            f"<td>{c['recall']:.2f}</td><td>{c['f1']:.2f}</td><td>{c['support']}</td></tr>"
        )
        assert row in html, row
    # one thumbnail per misclassified image, each with its true class and confidence
    mis = report["misclassified"]
    section = html.split("Misclassified test images")[1].split("<h2>")[0]
    assert section.count("<figure") == len(mis)
    for m in mis:
        assert f"called {escape(m['predicted'], quote=True)}</span> {m['confidence']:.2f}" in html


def test_class_names_from_folders_are_escaped(trained):
    _, bundle = trained
    html = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    assert ODD not in html and "<b>x" not in html
    assert "&lt;b&gt;x" in html and "fragmented &amp; co" in html
    assert "&lt;b&gt;x" in _text(html)


def test_thumbnails_of_16_bit_images_are_not_black(trained):
    data, _ = trained
    png = thumbnail_png(next((data / ODD).glob("*.tif")), 0, PreprocessSpec())
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape == (112, 112, 3) and img.max() > 200 and img.std() > 20


def test_cli_report_regenerates_it_without_retraining(model, capsys):
    _, bundle = model
    before = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    model_bytes = (bundle / "model.keras").read_bytes()
    (bundle / REPORT_HTML).unlink()
    assert cli_main(["report", str(bundle)]) == 0
    assert str(bundle / REPORT_HTML) in capsys.readouterr().out
    after = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    assert after == before  # same inputs, same page (curves and thumbnails included)
    assert (bundle / "model.keras").read_bytes() == model_bytes
    out = bundle.parent / "elsewhere" / "r.html"
    assert cli_main(["report", str(bundle), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == before


def test_cli_report_says_what_is_wrong(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 1
    assert "not a microclf model folder" in capsys.readouterr().err


def test_a_retraining_keeps_the_previous_report_in_previous(model, tmp_path):
    data, bundle = model
    before = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    train(_config(data, bundle, seed=1))
    assert (bundle / "previous" / REPORT_HTML).read_text(encoding="utf-8") == before
    now = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    assert now != before and "<td><code>seed</code></td><td><b>1</b></td>" in now


def test_unfamiliar_images_are_shown_when_the_report_lists_them(trained):
    data, bundle = trained
    meta = json.loads((bundle / "microclf.json").read_text())
    report = json.loads((bundle / "report.json").read_text())
    report.pop("unfamiliar", None), report.pop("unfamiliar_threshold", None)
    meta.pop("familiarity", None)
    assert "Unfamiliar" not in render_report_html(meta, report)  # no data: no section
    assert "unfamiliar-image check" not in render_report_html(meta, report)
    first = sorted((data / ODD).glob("*.tif"))[0]
    report["unfamiliar"] = [
        {
            "file": str(first),
            "page": 0,
            "score": 9.5,
            "true": ODD,
            "predicted": ODD,
            "confidence": 0.97,
        }
    ]
    report["unfamiliar_threshold"] = 4.25
    html = render_report_html(meta, report)
    assert "Unfamiliar test images (1)" in html and "score above 4.25" in html
    assert "score 9.5" in html and "<b>x" not in html
    section = html.split("Unfamiliar test images")[1].split("<h2>")[0]
    assert section.count("<figure") == 1 and first.name in section


def test_a_bundle_without_split_or_history_still_renders(trained, tmp_path):
    _, bundle = trained
    shutil.copytree(bundle, tmp_path / "m")
    (tmp_path / "m" / "split.json").unlink()
    html = report_html_for_bundle(tmp_path / "m")
    assert "own split list is missing" in html
    meta = json.loads((bundle / "microclf.json").read_text())
    meta.pop("history")
    html = render_report_html(meta, None)
    assert "Training curves" not in html and "No test images" in html


def test_the_train_widget_opens_the_html_report_in_the_browser(
    trained, qtbot, monkeypatch, make_napari_viewer, docked
):
    from qtpy.QtGui import QDesktopServices

    _, bundle = trained
    opened = []
    monkeypatch.setattr(
        QDesktopServices,
        "openUrl",
        staticmethod(lambda url: opened.append(url.toLocalFile()) or True),
    )
    widget = docked(make_napari_viewer(), "Train")
    assert not widget.html_btn.isEnabled()  # nothing trained yet
    report = json.loads((bundle / "report.json").read_text())
    meta = json.loads((bundle / "microclf.json").read_text())
    widget.show_report(report, bundle, meta)
    assert widget.html_btn.isEnabled() and widget.html_btn.text() == "Open HTML report"
    widget.html_btn.click()
    assert opened == [str(bundle / REPORT_HTML)]
    widget.show_report(report, bundle.parent / "no-such-model", meta)
    assert not widget.html_btn.isEnabled()
