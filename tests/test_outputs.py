"""Outputs never destroy what microclf did not write (issue 22, item 1, first part): an
output that names an input, the model, the working directory or a folder above it is
refused with one line before any work; --overwrite replaces only an earlier export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_microclf.cli import main as cli_main
from napari_microclf.core.errors import OutputError
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
