"""Evaluation against the model's own split: after a resplit, a moved or edited file, or on a
folder of new images, the score never includes an image the model trained on, and no
evaluation overwrites the training report."""

import json
import shutil

import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core.bundle import own_split
from napari_microclf.core.dataset import update_split
from napari_microclf.core.evaluate import evaluate
from napari_microclf.core.sample import make_image


@pytest.fixture()
def setup(scratch, tmp_path):
    """A private copy of the dataset and model for each test (they change files)."""
    data, bundle = scratch.dataset, scratch.bundle
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(bundle, tmp_path / "model")
    return tmp_path / "data", tmp_path / "model"


def test_the_bundle_keeps_its_own_split_with_hashes(setup):
    data, model = setup
    own = own_split(model)
    split = json.loads((data / "split.json").read_text())
    for subset in ("train", "val", "test"):
        keys = {e["key"] for e in own[subset]}
        assert keys == {k for k, v in split["assignments"].items() if v == subset}
        assert all(len(e["sha1"]) == 40 for e in own[subset])


def test_evaluate_after_a_resplit_scores_the_models_own_test_list(setup):
    data, model = setup
    own_test = {e["key"] for e in own_split(model)["test"]}
    for seed in range(1, 20):  # a new split whose test set differs from the model's
        new, _ = update_split(data, seed=seed, resplit=True)
        if set(new.files("test")) != own_test:
            break
    assert set(new.files("test")) != own_test
    report = evaluate(model, data)
    assert report["n"] == len(own_test) and report["subset"] == "test"
    assert "own test list" in report["title"]
    assert not report["missing"] and not report["changed"]
    train_report = evaluate(model, data, subset="train")
    assert train_report["n"] == len(own_split(model)["train"])
    assert "own train list" in train_report["title"]


def test_moved_missing_and_changed_test_images(setup):
    data, model = setup
    test = [e["key"] for e in own_split(model)["test"]]
    moved, gone, edited = test[0], test[1], test[2]
    (data / moved).rename((data / moved).with_name("renamed-outside.tif"))  # found by content
    (data / gone).unlink()
    tifffile.imwrite(data / edited, make_image("round", np.random.default_rng(5), 48))
    report = evaluate(model, data)
    assert report["n"] == len(test) - 2
    assert report["missing"] == [gone] and report["changed"] == [edited]
    assert any("missing" in n for n in report["notes"])


def test_all_scores_only_images_the_model_never_saw(setup, tmp_path):
    data, model = setup
    new = tmp_path / "new"
    rng = np.random.default_rng(77)
    for cls in ("round", "elongated", "fragmented"):
        (new / cls).mkdir(parents=True)
        for i in range(3):
            tifffile.imwrite(new / cls / f"fresh_{i}.tif", make_image(cls, rng, 48))
    seen = own_split(model)["train"][0]["key"]
    shutil.copy(data / seen, new / seen.split("/")[0] / "copy_of_a_training_image.tif")
    (new / "unknown_class").mkdir()
    report = evaluate(model, new, all_images=True)
    assert report["n"] == 9 and report["subset"] == "all"
    assert len(report["flagged"]) == 1 and "copy_of_a_training_image" in report["flagged"][0]
    assert any("unknown_class" in n for n in report["notes"])


def test_evaluations_never_overwrite_the_training_report(setup, capsys):
    data, model = setup
    before = {p: (model / p).read_bytes() for p in ("report.md", "report.json")}
    assert cli_main(["evaluate", str(model), str(data)]) == 0
    assert cli_main(["evaluate", str(model), str(data), "--subset", "val"]) == 0
    assert cli_main(["evaluate", str(model)]) == 0  # the model's own dataset by default
    out = capsys.readouterr().out
    assert "own val list" in out and "Report saved to" in out
    assert {p: (model / p).read_bytes() for p in before} == before
    reports = sorted((model / "reports").glob("*.md"))
    assert len(reports) == 3 and len(list((model / "reports").glob("*.json"))) == 3
    assert sum(p.name.endswith("-val.md") for p in reports) == 1
    assert reports[0].read_text().startswith("# Evaluation of model on its own")


def test_all_with_nothing_to_score_exits_1_with_a_line(setup, capsys):
    data, model = setup
    # every image of the dataset was in the model's train, val or test list: --all scores
    # only the test ones; with those gone, nothing is left
    for e in own_split(model)["test"]:
        (data / e["key"]).unlink()
    assert cli_main(["evaluate", str(model), str(data), "--all"]) == 1
    err = capsys.readouterr().err
    assert "nothing to score" in err and "seen in training or validation" in err
    assert not (model / "reports").exists()  # no empty report saved
