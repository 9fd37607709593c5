"""Folder classification past bad files, the CSV destination checked first, explicit page axes,
and the Predict widget's bounded model cache and Classify folder."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core import csv_format
from napari_microclf.core import predictor as predictor_mod
from napari_microclf.core.bundle import write_bundle
from napari_microclf.core.csv_format import write_csv
from napari_microclf.core.errors import ImageReadError, OutputError
from napari_microclf.core.folder_runs import predict_folder
from napari_microclf.core.images import PreprocessSpec
from napari_microclf.core.model import LITE0, build_classifier
from napari_microclf.core.predict import predict
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.results import FileError, FolderResult, PagePrediction

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A two-class bundle of a random 32 px model: prediction mechanics, not accuracy."""
    model = build_classifier(2, 32, None, fine_tune="all", augment=False, backbone=LITE0)
    return write_bundle(
        tmp_path_factory.mktemp("bundle") / "b",
        model,
        {"class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()},
    )


@pytest.fixture(scope="module")
def predictor(bundle):
    return Predictor(bundle, batch_size=2)


def _gray(h=32, w=32):
    return RNG.integers(0, 4000, (h, w)).astype(np.uint16)


def _truncated_stack(path: Path, pages=4):
    """A ZYX stack whose last page lost its end (a copy that was cut short)."""
    tifffile.imwrite(
        path,
        np.stack([_gray() for _ in range(pages)]),
        metadata={"axes": "ZYX"},
        photometric="minisblack",
    )
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _mixed_folder(folder: Path) -> dict[str, int | None]:
    """Good and bad files interleaved; name -> pages expected (None: an error row only)."""
    folder.mkdir()
    tifffile.imwrite(
        folder / "a_stack.tif",
        np.stack([_gray() for _ in range(3)]),
        metadata={"axes": "ZYX"},
        photometric="minisblack",
    )
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    tifffile.imwrite(folder / "c_mask.tif", _gray() > 2000)  # bool: a mask is classified
    tifffile.imwrite(folder / "d_line.tif", _gray(1, 20000))
    iio.imwrite(folder / "e_good.png", (_gray() // 16).astype(np.uint8))
    tifffile.imwrite(folder / "f_dot.tif", _gray(1, 1))
    _truncated_stack(folder / "g_cut.tif")
    (folder / "sub").mkdir()
    iio.imwrite(folder / "sub" / "h_rgb.png", RNG.integers(0, 255, (32, 40, 3), np.uint8))
    return {
        "a_stack.tif": 3,
        "b_corrupt.png": None,
        "c_mask.tif": 1,
        "d_line.tif": None,
        "e_good.png": 1,
        "f_dot.tif": None,
        "g_cut.tif": 3,
        "h_rgb.png": 1,
    }


def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_a_folder_with_bad_files_is_classified_to_the_end(bundle, tmp_path, capsys):
    expected = _mixed_folder(tmp_path / "images")
    out = tmp_path / "out.csv"
    assert cli_main(["predict", str(bundle), str(tmp_path / "images"), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    rows = _rows(out)
    assert list(rows[0]) == ["file", "page", "class", "confidence", "p_a", "p_b", "status", "error"]
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(Path(r["file"]).name, []).append(r)
    assert list(by_file) == list(expected)  # every file, in order, the bad ones in place
    for name, pages in expected.items():
        ok = [r for r in by_file[name] if r["status"] == "ok"]
        bad = [r for r in by_file[name] if r["status"] == "error"]
        assert len(ok) == (pages or 0), name
        assert all(r["error"] == "" and r["class"] in ("a", "b") for r in ok)
        assert len(bad) == (
            0 if name in ("a_stack.tif", "c_mask.tif", "e_good.png", "h_rgb.png") else 1
        ), name
        for r in bad:
            assert r["class"] == "" and r["p_a"] == "" and "\n" not in r["error"]
            assert name not in r["error"]  # the file column names it already
    reasons = {name: rs[-1]["error"] for name, rs in by_file.items()}
    assert "cannot read this image" in reasons["b_corrupt.png"]
    assert "pip install" not in reasons["b_corrupt.png"]  # imageio's hints condensed
    assert "1 x 20000 pixels" in reasons["d_line.tif"] and "at least 2" in reasons["d_line.tif"]
    assert "1 x 1 pixels" in reasons["f_dot.tif"]
    assert reasons["g_cut.tif"].startswith("page 3") and "truncated" in reasons["g_cut.tif"]
    assert by_file["g_cut.tif"][-1]["page"] == "3"

    summary = printed[-1]
    assert summary.startswith(
        "Classified 9 pages from 5 of 8 files; 4 files could not be "
        "read (1 only in part; listed in the CSV's error column): "
        "b_corrupt.png: "
    )
    assert "d_line.tif: too small: 1 x 20000 pixels" in summary and "and 1 more" in summary
    assert summary.endswith(f"CSV: {out}")
    assert any(
        line.startswith(str(tmp_path / "images" / "d_line.tif")) and "\terror\t" in line
        for line in printed
    )  # each bad file printed as it comes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.csv"]  # no .partial


def test_a_folder_of_only_bad_files_exits_1_with_a_summary(bundle, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"\xff\xd8 broken")
    tifffile.imwrite(folder / "y.tif", _gray(1, 300))
    out = tmp_path / "out.csv"
    assert cli_main(["predict", str(bundle), str(folder), "--csv", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(
        "No page could be classified (2 files tried); 2 files could not be read"
    )
    assert "x.jpg: cannot read" in printed[0] and "y.tif: too small: 1 x 300 pixels" in printed[0]
    assert [r["status"] for r in _rows(out)] == ["error", "error"]


def test_an_empty_folder_says_so_before_the_model_loads(bundle, tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(predictor_mod, "load_bundle", lambda p: loads.append(p))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert cli_main(["predict", str(bundle), str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no images in" in err[0] and loads == []


@pytest.mark.parametrize("where", ["missing folder", "a folder", "folder is a file"])
def test_the_csv_destination_is_checked_before_the_model_loads(
    bundle, tmp_path, capsys, monkeypatch, where
):
    loads = []
    monkeypatch.setattr(predictor_mod, "load_bundle", lambda p: loads.append(p))
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", _gray())
    (tmp_path / "file").write_text("x")
    dest, says = {
        "missing folder": (tmp_path / "no" / "such" / "out.csv", "does not exist; create it"),
        "a folder": (images, "is a folder; give a file name"),
        "folder is a file": (tmp_path / "file" / "out.csv", "is a file, not a folder"),
    }[where]
    assert cli_main(["predict", str(bundle), str(images), "--csv", str(dest)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], err
    assert captured.out == "" and loads == []  # nothing loaded, nothing classified
    with pytest.raises(OutputError, match=says.split(";")[0]):
        predict_folder(bundle, images, dest)
    assert loads == []


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="needs POSIX permissions and a user that they bind (not root)",
)
def test_a_read_only_csv_folder_is_refused_first(bundle, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(predictor_mod, "load_bundle", lambda p: loads.append(p))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="no permission to create files in"):
            predict_folder(bundle, tmp_path, locked / "out.csv")
    finally:
        locked.chmod(0o755)
    assert loads == []


def test_a_folder_where_files_cannot_be_created_is_refused_first(bundle, tmp_path, monkeypatch):
    """The same for any user (root passes permission bits): creating the probe file fails."""
    loads = []
    monkeypatch.setattr(predictor_mod, "load_bundle", lambda p: loads.append(p))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(csv_format.tempfile, "mkstemp", refuse)
    with pytest.raises(
        OutputError,
        match=r"no permission to create files in .*\(Permission "
        r"denied\); choose a CSV path in a folder you can",
    ):
        predict_folder(bundle, tmp_path, tmp_path / "out.csv")
    assert loads == []


def test_rows_are_streamed_and_an_interrupted_run_keeps_them(predictor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        tifffile.imwrite(folder / f"{i}.tif", _gray())
    out = tmp_path / "out.csv"
    out.write_text("an earlier run's CSV\n")
    seen = []

    def explode(item):
        seen.append(item)
        # a batch (2 pages) is on disk before its pages are reported
        assert len(_rows(out.with_name("out.csv.partial"))) == 2 * ((len(seen) + 1) // 2)
        if len(seen) == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        predict_folder(predictor, folder, out, on_item=explode)
    partial = _rows(out.with_name("out.csv.partial"))
    assert [Path(r["file"]).name for r in partial] == [f"{i}.tif" for i in range(6)]
    assert out.read_text() == "an earlier run's CSV\n"  # replaced only by a complete run

    # should_stop: stops after the batch it sees, keeps the rows in the partial file
    result = predict_folder(predictor, folder, out, should_stop=lambda: True)
    assert result.stopped and len(result) == 2 and result.csv_path.name == "out.csv.partial"
    assert len(_rows(result.csv_path)) == 2
    assert "before the run was stopped" in result.summary()
    assert out.read_text() == "an earlier run's CSV\n"

    result = predict_folder(predictor, folder, out)  # a complete run replaces both
    assert not result.stopped and result.csv_path == out and len(_rows(out)) == 8
    assert not out.with_name("out.csv.partial").exists()


def test_the_api_returns_errors_with_the_results(predictor, bundle, tmp_path):
    expected = _mixed_folder(tmp_path / "images")
    result = predict(predictor, tmp_path / "images")
    assert isinstance(result, FolderResult) and result.ok and result.n_files == len(expected)
    assert len(result) == 9 and all(isinstance(p, PagePrediction) for p in result)
    assert result[0].file.endswith("a_stack.tif") and [p.page for p in result[:3]] == [0, 1, 2]
    assert [(Path(e.path).name, e.page) for e in result.errors] == [
        ("b_corrupt.png", None),
        ("d_line.tif", 0),
        ("f_dot.tif", 0),
        ("g_cut.tif", 3),
    ]
    assert str(result.errors[1]) == f"{result.errors[1].path}: {result.errors[1].message}"
    # a list of paths is a folder run too; the CSV of the result has the status columns
    result = predict(
        predictor, [tmp_path / "images" / "e_good.png", tmp_path / "images" / "f_dot.tif"]
    )
    assert len(result) == 1 and len(result.errors) == 1
    assert write_csv(result, tmp_path / "r.csv", predictor.class_names) == 2
    assert [r["status"] for r in _rows(tmp_path / "r.csv")] == ["ok", "error"]
    # predict_paths keeps its contract: stop at the first bad file, naming it
    with pytest.raises(ImageReadError, match="b_corrupt.png: cannot read"):
        list(predictor.predict_paths([tmp_path / "images"]))


def test_a_single_bad_file_raises_a_named_error(predictor, tmp_path):
    tifffile.imwrite(tmp_path / "line.tif", _gray(1, 20000))
    with pytest.raises(
        ImageReadError,
        match=r"line\.tif: too small: 1 x 20000 pixels .* at "
        "least 2 pixels",
    ):
        predict(predictor, tmp_path / "line.tif")
    with pytest.raises(ImageReadError, match=r"line\.tif: too small: 1 x 20000"):
        list(predictor.predict_file(tmp_path / "line.tif"))
    with pytest.raises(ImageReadError, match=r"^image: too small: 1 x 1 pixels"):
        predict(predictor, np.zeros((1, 1)))


def test_wrong_channels_are_an_error_row(bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a_gray.png", (_gray() // 16).astype(np.uint8))
    iio.imwrite(folder / "b_rgb.png", RNG.integers(0, 255, (32, 32, 3), np.uint8))
    rgb_model = Predictor(bundle)
    rgb_model.spec = dataclasses.replace(rgb_model.spec, channel_map=(0, 1, 2))
    result = predict_folder(rgb_model, folder)
    assert [Path(p.file).name for p in result] == ["b_rgb.png"]
    (error,) = result.errors
    assert Path(error.path).name == "a_gray.png" and "channel 1" in error.message
    assert "has 1 channel(s)" in error.message


def test_predict_takes_an_explicit_page_axis(predictor):
    stack = np.stack([_gray() for _ in range(5)])  # (5, 32, 32)
    first = predict(predictor, stack, page_axis=0)
    assert [p.page for p in first] == list(range(5)) and all(p.file is None for p in first)
    last = predict(predictor, np.moveaxis(stack, 0, -1), page_axis=-1)  # (32, 32, 5)
    for a, b in zip(first, last, strict=True):
        assert a.class_name == b.class_name and a.confidence == pytest.approx(
            b.confidence, abs=1e-5
        )
    assert len(predictor.predict_array(stack, pages=True)) == 5  # the older spelling
    with pytest.raises(
        ImageReadError,
        match=r"shape \(5, 32, 32\) is not one image.*"
        r"page_axis=0",
    ):
        predict(predictor, stack)  # nothing guessed
    with pytest.raises(ImageReadError, match="is not one image"):
        predict(predictor, np.moveaxis(stack, 0, -1))  # 5 channels? no: say which axis
    with pytest.raises(ImageReadError, match="page_axis=3 does not exist"):
        predict(predictor, stack, page_axis=3)
    rgb = RNG.integers(0, 255, (32, 32, 3), np.uint8)
    assert len(predict(predictor, rgb)) == 1  # (Y, X, C) with C <= 4: one page
    assert len(predict(predictor, np.stack([rgb, rgb]), page_axis=0)) == 2
    assert len(predict(predictor, _gray())) == 1
    with pytest.raises(TypeError, match="page_axis is for arrays"):
        predict(predictor, "x.tif", page_axis=0)


def test_write_csv_keeps_its_columns_without_errors(tmp_path):
    preds = [PagePrediction("x.tif", 0, "a", 0.9, {"a": 0.9, "b": 0.1})]
    write_csv(preds, tmp_path / "p.csv", ["a", "b"])
    assert list(_rows(tmp_path / "p.csv")[0]) == [
        "file",
        "page",
        "class",
        "confidence",
        "p_a",
        "p_b",
    ]
    write_csv([*preds, FileError("y.tif", "=cannot read", None)], tmp_path / "e.csv", ["a", "b"])
    rows = _rows(tmp_path / "e.csv")
    assert [(r["status"], r["error"]) for r in rows] == [("ok", ""), ("error", "'=cannot read")]


# -- the Predict widget ---------------------------------------------------------------------


def test_the_model_cache_is_bounded(tmp_path):
    from napari_microclf._qt.predictor_cache import CACHE_SIZE, PredictorCache

    made = []

    class FakePredictor:
        def __init__(self, folder, engine="auto", precision="f32"):
            made.append(Path(folder).name)
            self.engine, self.precision = engine, precision

    cache = PredictorCache(load=FakePredictor)
    for name in "abc":
        (tmp_path / name).mkdir()
    get = cache.get
    a = get(tmp_path / "a")
    assert get(tmp_path / "a") is a and made == ["a"]
    assert cache.info()[:2] == (1, 1)  # hits, misses
    get(tmp_path / "b")
    assert get(tmp_path / "a") is a  # a is now the most recently used
    get(tmp_path / "c")  # evicts b, the least recently used
    assert len(cache) == cache.size == CACHE_SIZE == 2
    assert get(tmp_path / "a") is a and made == ["a", "b", "c"]
    get(tmp_path / "b")
    assert made == ["a", "b", "c", "b"] and len(cache) == 2
    cache.forget(tmp_path / "b")
    assert len(cache) == 1 and get(tmp_path / "a") is a
    # another engine or precision (the Engine row) is another loaded model
    fast = get(tmp_path / "b", "openvino", "int8")
    assert fast is not get(tmp_path / "b") and (fast.engine, fast.precision) == ("openvino", "int8")


def _notifications(level):
    from napari.utils.notifications import notification_manager

    return [
        str(n.message)
        for n in notification_manager.records
        if str(n.severity).lower().endswith(level)
    ]


def test_classify_folder_in_the_widget_goes_past_a_bad_file(
    make_napari_viewer, qtbot, bundle, tmp_path, docked
):
    expected = _mixed_folder(tmp_path / "images")
    widget = docked(make_napari_viewer(), "Predict")
    widget.set_bundle(bundle)
    # a CSV destination that cannot work is refused before anything starts
    assert widget.classify_folder(tmp_path / "images", tmp_path / "no" / "out.csv") is None
    assert any("does not exist; create it" in m for m in _notifications("error"))
    assert widget.worker is None and widget.folder_btn.isEnabled()

    out = tmp_path / "out.csv"
    worker = widget.classify_folder(tmp_path / "images", out)
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    rows = _rows(out)
    assert len(rows) == 9 + 4 and sum(r["status"] == "error" for r in rows) == 4
    assert {Path(r["file"]).name for r in rows} == set(expected)
    status = widget.status.text()
    assert status.startswith("Classified 9 pages from 5 of 8 files; 4 files could not be read")
    assert status.endswith(f"CSV: {out}")
    assert widget.pbar.n == widget.pbar.total
    assert any("4 files could not be read" in m for m in _notifications("warning"))


def test_classify_folder_shows_an_unexpected_error_with_its_traceback(
    make_napari_viewer, qtbot, bundle, tmp_path, monkeypatch, docked
):
    """Not a MicroclfError: re-raised in the main thread, where napari's excepthook shows it as
    a notification with its traceback (pytest-qt captures it here)."""
    from napari_microclf._qt import predict as qt_predict

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a bad file")
        yield  # a generator, like iter_folder

    monkeypatch.setattr(qt_predict, "iter_folder", broken)
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", _gray())
    widget = docked(make_napari_viewer(), "Predict")
    widget.set_bundle(bundle)
    with qtbot.capture_exceptions() as raised:
        worker = widget.classify_folder(images, tmp_path / "out.csv")
        assert worker is not None
        # not waitSignal(worker.finished) after the start: failing at once, the worker can
        # finish before that connects; the widget's own slot is connected before the start
        qtbot.waitUntil(lambda: widget.worker is None and len(raised) > 0, timeout=120000)
    ((exc_type, exc, tb),) = raised
    assert exc_type is TypeError and "a bug" in str(exc) and tb is not None
    assert widget.worker is None and widget.folder_btn.isEnabled()
    assert not any("a bug" in m for m in _notifications("error"))  # not a bare one-liner


def _stopped_after_a_batch(bundle, tmp_path, names):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        tifffile.imwrite(folder / name, _gray())
    out = tmp_path / "out.csv"
    stopped = predict_folder(bundle, folder, out, batch_size=2, should_stop=lambda: True)
    assert stopped.stopped and len(stopped) == 2
    return folder, out, out.with_name("out.csv.partial")


def test_resume_never_mixes_two_models_or_two_settings(bundle, tmp_path):
    folder, out, partial = _stopped_after_a_batch(bundle, tmp_path, [f"{i}.tif" for i in range(5)])
    before = partial.read_bytes()
    # another model with the same classes (so the same columns): refused, nothing appended
    other = write_bundle(
        tmp_path / "other",
        build_classifier(2, 32, None, fine_tune="all", augment=False, backbone=LITE0, seed=7),
        {"class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()},
    )
    with pytest.raises(OutputError, match="another model or settings.*model.keras SHA-256"):
        predict_folder(other, folder, out, resume=True)
    with pytest.raises(OutputError, match="threshold 0.0, now threshold 0.5"):
        predict_folder(bundle, folder, out, resume=True, threshold=0.5)
    with pytest.raises(OutputError, match="tta False, now tta True"):
        predict_folder(bundle, folder, out, resume=True, tta=True)
    assert partial.read_bytes() == before
    # the same model and settings continue it; the record goes with the partial file
    result = predict_folder(bundle, folder, out, resume=True)
    assert result.resumed == 2 and len(_rows(out)) == 5
    assert not partial.exists() and not partial.with_name("out.csv.partial.json").exists()


def test_a_torn_record_with_a_line_break_in_its_file_name_is_dropped_on_resume(bundle, tmp_path):
    names = ["a\nb.tif", "c.tif", "d\ne.tif", "f.tif"]
    folder, out, partial = _stopped_after_a_batch(bundle, tmp_path, names)
    with open(partial, "ab") as f:  # killed while writing the next record, after its \n
        f.write(b'"' + str(folder / "d").encode() + b'\ne.tif",0,a,0.5')
    predict_folder(bundle, folder, out, resume=True)
    rows = list(csv.reader(out.open(newline="", encoding="utf-8")))
    assert all(len(r) == len(rows[0]) for r in rows)
    assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(names)
