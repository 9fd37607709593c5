"""Outputs never destroy what microclf did not write (issue 22, item 1, first part): an
output that names an input, the model, the working directory or a folder above it is
refused with one line before any work; --overwrite replaces only an earlier export."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from napari_microclf.cli import main as cli_main
from napari_microclf.core.errors import OutputError
from napari_microclf.core.features import (
    CACHE_DIR,
    FeatureCache,
    cache_entries,
    prune_cache,
    remove_stale_temporaries,
)
from napari_microclf.core.files import refuse_destroying


def _said(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_export_overwrite_never_deletes_the_working_directory(lite0, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code = cli_main(
        ["export", str(lite0.bundle), "--format", "savedmodel", "--out", ".", "--overwrite"]
    )
    assert code != 0 and "working directory" in _said(capsys)
    assert (work / "notes.txt").read_text() == "mine"
    # nor a folder above it, nor the model folder, nor a folder that holds the model
    for out in (str(tmp_path), str(lite0.bundle), str(Path(lite0.bundle).parent)):
        assert (
            cli_main(
                ["export", str(lite0.bundle), "--format", "savedmodel", "--out", out, "--overwrite"]
            )
            != 0
        )
        assert "microclf: error: export destination" in _said(capsys)
    assert (Path(lite0.bundle) / "model.keras").is_file()


def test_overwrite_replaces_only_an_earlier_export(lite0, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2\n")
    args = ["export", str(lite0.bundle), "--format", "savedmodel", "--out", str(folder)]
    assert cli_main([*args, "--overwrite"]) != 0
    assert "is not an earlier savedmodel export" in _said(capsys)
    assert (folder / "data.csv").read_text() == "1,2\n"
    text = tmp_path / "model.zip"
    text.write_text("not a zip")
    assert (
        cli_main(
            ["export", str(lite0.bundle), "--format", "zip", "--out", str(text), "--overwrite"]
        )
        != 0
    )
    assert text.read_text() == "not a zip"


def test_predict_csv_and_heatmap_never_replace_an_input_or_the_model(lite0, tmp_path, capsys):
    image = sorted(Path(lite0.dataset).rglob("*.tif"))[0]
    before = image.read_bytes()
    folder = str(image.parent)
    assert cli_main(["predict", str(lite0.bundle), folder, "--csv", str(image)]) != 0
    said = _said(capsys)
    assert "CSV destination" in said and "one of the inputs" in said
    assert image.read_bytes() == before
    assert cli_main(["label-next", str(lite0.bundle), folder, "--csv", str(image)]) == 1
    assert "one of the inputs" in _said(capsys) and image.read_bytes() == before
    assert cli_main(["explain", str(lite0.bundle), str(image), "--out", str(image)]) != 0
    assert "heatmap destination" in _said(capsys)
    model_file = Path(lite0.bundle) / "model.keras"
    size = model_file.stat().st_size
    assert cli_main(["explain", str(lite0.bundle), str(image), "--out", str(model_file)]) != 0
    assert "is inside" in _said(capsys)
    assert model_file.stat().st_size == size and image.read_bytes() == before


def test_a_link_to_an_input_is_the_input(tmp_path):
    image = tmp_path / "a.tif"
    image.write_bytes(b"x")
    link = tmp_path / "link.csv"
    os.symlink(image, link)
    with pytest.raises(OutputError, match="one of the inputs"):
        refuse_destroying(link, inputs=[image])
    refuse_destroying(tmp_path / "new.csv", inputs=[image], protected=[tmp_path / "model"])


def _old(path: Path, days: float = 40) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def _a_key_folder(data: Path, key: str) -> Path:
    """A cache folder as a training leaves it (key.json, one entry, a last-used stamp), old."""
    cache = FeatureCache(data, key, {"spec": {}})
    cache.save("0" * 40, np.zeros((1, 1, 4), np.float32))
    cache.touch()
    _old(cache.folder / "last-used")
    return cache.folder


def test_a_linked_feature_cache_is_used_but_never_cleaned_through(tmp_path, capsys):
    data, scratch = tmp_path / "data", tmp_path / "scratch"
    data.mkdir()
    (scratch / "thesis").mkdir(parents=True)
    (scratch / "thesis" / "chapter.txt").write_text("mine")
    _old(scratch / "thesis")
    (data / CACHE_DIR).symlink_to(scratch)
    ours = _a_key_folder(data, "k1")  # written through the link, into scratch
    assert ours.resolve().parent == scratch.resolve()
    assert [e["key"] for e in cache_entries(data)] == ["k1"]  # the user's folder is not ours
    assert prune_cache(data, max_age_days=0) == [] and remove_stale_temporaries(data) == 0
    assert (scratch / "thesis" / "chapter.txt").read_text() == "mine" and ours.exists()
    assert cli_main(["cache", "clear", str(data)]) == 1
    said = _said(capsys)
    assert "symbolic link" in said and "Traceback" not in said
    assert (data / CACHE_DIR).is_symlink() and (scratch / "thesis" / "chapter.txt").exists()


def test_cache_cleaning_removes_only_key_folders_microclf_made(tmp_path, capsys):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    (outside / "results").mkdir(parents=True)
    (outside / "results" / "table.csv").write_text("a,b")
    ours = _a_key_folder(data, "k1")
    cache = data / CACHE_DIR
    (cache / "results-link").symlink_to(outside / "results")  # a link: never followed
    (cache / "notes").mkdir()  # unmarked: not ours
    (cache / "notes" / "n.txt").write_text("mine")
    _old(cache / "notes")
    assert prune_cache(data, max_age_days=1) == ["k1"] and not ours.exists()
    assert (cache / "notes" / "n.txt").exists() and (outside / "results" / "table.csv").exists()
    _a_key_folder(data, "k2")
    assert cli_main(["cache", "clear", str(data)]) == 0
    said = _said(capsys)
    assert "notes" in said and "results-link" in said  # named, left as they were
    assert sorted(p.name for p in cache.iterdir()) == ["notes", "results-link"]
    assert (outside / "results" / "table.csv").read_text() == "a,b"


def test_training_into_the_dataset_or_a_locked_folder_is_refused_before_tensorflow(
    small_sample, tmp_path, monkeypatch, capsys
):
    import threading

    import napari_microclf.cli as cli
    from napari_microclf.core.lock import model_lock

    def no_tensorflow():
        raise AssertionError("TensorFlow started before the refusal")

    monkeypatch.setattr(cli, "_start_tensorflow_quietly", no_tensorflow)
    data = small_sample["dataset"]
    for out in (data / "model", data, data.parent):  # inside, the dataset, above it
        assert cli_main(["train", str(data), "--out", str(out)]) == 1
        assert "model folder" in _said(capsys)
    assert not (data / "model").exists()
    held, release = threading.Event(), threading.Event()

    def hold():  # another thread is refused as another process is
        with model_lock(tmp_path / "m", "microclf train (the first)"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(30)
        assert cli_main(["train", str(data), "--out", str(tmp_path / "m")]) == 1
        assert "is being written by microclf train (the first)" in _said(capsys)
    finally:
        release.set()
        holder.join()


def test_sample_never_lands_among_other_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "round").mkdir(parents=True)
    (mine / "round" / "real.tif").write_bytes(b"real")
    assert cli_main(["sample", str(mine), "--per-class", "2", "--size", "32"]) == 1
    assert "not a microclf sample" in _said(capsys)
    assert [p.name for p in (mine / "round").iterdir()] == ["real.tif"]
    fresh = tmp_path / "fresh"
    args = ["sample", str(fresh), "--per-class", "2", "--size", "32"]
    assert cli_main(args) == 0 and cli_main(args) == 0  # a rerun keeps the same sample
    assert len(list((fresh / "dataset" / "round").iterdir())) == 2
    assert cli_main(["sample", str(fresh), "--per-class", "3", "--size", "32"]) == 1
    assert "other settings" in _said(capsys)
    assert len(list((fresh / "dataset" / "round").iterdir())) == 2


def test_files_written_atomically_follow_the_users_umask(lite0, tmp_path):
    from napari_microclf.core.bundle import zip_bundle
    from napari_microclf.core.csv_format import write_csv_rows
    from napari_microclf.core.files import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "split.json", "{}")
        write_csv_rows(tmp_path / "p.csv", [["file"], ["a.tif"]])
        zip_bundle(lite0.bundle, tmp_path / "m.zip")
    finally:
        os.umask(old)
    for name in ("split.json", "p.csv", "m.zip"):  # 0666 less the umask, not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_a_demo_folder_of_an_earlier_version_is_taken_up(tmp_path, capsys):
    from napari_microclf.core.sample import SAMPLE_MARKER, write_sample

    old = tmp_path / "demo-output"
    write_sample(old, n_per_class=2, size=32)
    (old / SAMPLE_MARKER).unlink()  # as microclf wrote it before the marker
    (old / "model").mkdir()
    assert write_sample(old, n_per_class=2, size=32, fields=1)["fields"]
    assert (old / SAMPLE_MARKER).is_file() and (old / "model").is_dir()
    (old / "dataset" / "round" / "mine.tif").write_bytes(b"x")  # a user's file: refused
    (old / SAMPLE_MARKER).unlink()
    assert cli_main(["sample", str(old), "--per-class", "2", "--size", "32"]) == 1
    assert "not a microclf sample" in _said(capsys)
