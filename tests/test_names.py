"""Names cannot collide (issue 22, item 3): a class's probability column never takes a fixed
column's place; names a prediction uses for itself, and classes that differ only in case, are
refused when a class is made or trained; every field of microclf.json is checked, in one line."""

from __future__ import annotations

import csv
import json

import pytest

from napari_microclf.cli import main as cli_main
from napari_microclf.core.csv_format import write_csv
from napari_microclf.core.dataset import add_class, check_class_name, check_dataset, rename_class
from napari_microclf.core.errors import DatasetError
from napari_microclf.core.preflight import scan_images
from napari_microclf.core.results import FileError, PagePrediction


def test_classes_named_like_fixed_columns_keep_their_probabilities(tmp_path):
    names = ["status", "unfamiliar_cells", "error", "file"]
    probs = dict(zip(names, [0.1, 0.2, 0.3, 0.4], strict=True))
    page = PagePrediction("a.tif", 0, "file", 0.4, probs, unfamiliar_score=0.5)
    out = tmp_path / "p.csv"
    write_csv([page, FileError("b.tif", "cannot read")], out, names)
    with out.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header))  # no column twice
    with out.open(newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert [float(row[f"p_{n}"]) for n in names] == [0.1, 0.2, 0.3, 0.4]
    assert (row["file"], row["class"], row["status"]) == ("a.tif", "file", "ok")
    assert row["unfamiliar"] == "0.5000"


@pytest.mark.parametrize("name", ["uncertain", "Unfamiliar", " unfamiliar "])
def test_names_a_prediction_uses_for_itself_are_no_class_names(name):
    with pytest.raises(DatasetError, match="reserved"):
        check_class_name(name)


def test_classes_that_differ_only_in_case_are_refused(tmp_path):
    add_class(tmp_path, "round")
    add_class(tmp_path, "long")
    with pytest.raises(DatasetError, match="differs only in case"):
        add_class(tmp_path, "Round")
    with pytest.raises(DatasetError, match="differs only in case"):
        rename_class(tmp_path, "long", "ROUND")
    assert rename_class(tmp_path, "long", "Long").name == "Long"  # its own case: fine
    # folders made outside microclf: training says so
    for c in ("Round", "unfamiliar"):
        (tmp_path / c).mkdir()
    for c in ("round", "Round", "Long", "unfamiliar"):
        (tmp_path / c / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="differ only in case|reserved"):
        check_dataset(tmp_path)


def test_images_in_sub_folders_of_a_class_are_named(small_sample, private_copy):
    data = private_copy(small_sample["dataset"])
    nested = data / "round" / "batch2"
    nested.mkdir()
    (data / "round" / "sample_000.tif").rename(nested / "moved.tif")
    (data / "round" / ".hidden").mkdir()
    warnings = scan_images(data).warnings
    (said,) = [w for w in warnings if "inside class folders" in w]
    assert "round/batch2" in said and ".hidden" not in said


@pytest.mark.parametrize(
    "change, said",
    [
        ({"preprocessing": {"image_size": 10**9}}, "image size must be 8 to 1024"),
        ({"class_names": ["a", "b", "a"]}, "'a' more than once"),
        ({"class_names": ["a", ""]}, "empty name"),
        ({"config": "epochs=5"}, "config has the wrong type"),
        ({"files": ["../../etc/passwd"]}, "plain file names"),
        ({"preprocessing": {"pmin": "low"}}, "pmin must be a number"),
    ],
)
def test_a_tampered_microclf_json_is_said_in_one_line(
    lite0, private_copy, tmp_path, capsys, change, said
):
    bundle = private_copy(lite0.bundle)
    meta = json.loads((bundle / "microclf.json").read_text())
    for key, value in change.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    (bundle / "microclf.json").write_text(json.dumps(meta))
    image = lite0.files["test"][0]
    assert cli_main(["predict", str(bundle), str(image), "--csv", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert said in err and "microclf.json" in err and "Traceback" not in err
