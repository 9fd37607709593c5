"""Tests that could fail: learning-rate reduction and early stopping on a constructed plateau,
multichannel images and ``--channels`` through the real reading and preprocessing into a
training and a prediction, and ``--resplit`` from the command line.

Tiny models at 32 px: from scratch (weights none, a few eager steps) or a frozen Lite0 with
its head on cached features where many epochs are needed.
"""

import json

import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core.images import PreprocessSpec, preprocess, read_page
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.sample import make_sample_dataset
from napari_microclf.core.train import Message, TrainConfig, train


def _noise_dataset(root, n=16, size=32, seed=0):
    """Two classes of pure noise: nothing to learn, so the validation loss plateaus."""
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            tifffile.imwrite(
                root / cls / f"{cls}{i:02d}.tif", rng.integers(0, 255, (size, size), np.uint8)
            )
    return root


def test_plateau_reduces_the_learning_rate_then_stops_early_at_the_best_epoch(tmp_path):
    data = _noise_dataset(tmp_path / "noise")
    epochs, lr, factor, lr_patience, stop_patience = 30, 1e-3, 0.5, 1, 3
    config = TrainConfig(
        str(data),
        str(tmp_path / "model"),
        epochs=epochs,
        batch_size=8,
        learning_rate=lr,
        image_size=32,
        backbone="efficientnet-lite0",  # frozen, the head on cached features: 30 quick epochs
        weights="imagenet",
        augment=False,
        class_weights=False,
        early_stopping=True,
        early_stopping_patience=stop_patience,
        reduce_lr_patience=lr_patience,
        reduce_lr_factor=factor,
        seed=0,
    )
    updates = []
    result = train(config, updates.append)
    history = result.history
    val, lrs = history["val_loss"], history["lr"]
    # ReduceLROnPlateau's rule, replayed on the recorded validation losses (min_delta 1e-4)
    expected, best, wait = lr, np.inf, 0
    for i, v in enumerate(val):
        assert lrs[i] == pytest.approx(expected, rel=1e-5), (i, lrs, val)
        if v < best - 1e-4:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= lr_patience:
                expected, wait = max(expected * factor, config.min_lr), 0
    assert min(lrs) < lr, "the learning rate was never reduced"
    # EarlyStopping: stopped `patience` epochs after the best one, long before `epochs`
    best_epoch = int(np.argmin(val)) + 1
    assert result.epochs_run == best_epoch + stop_patience < epochs, (val, result.epochs_run)
    texts = [u.text for u in updates if isinstance(u, Message)]
    assert (
        f"Early stopping after epoch {result.epochs_run}: the validation loss stopped "
        "improving; "
        f"the weights of epoch {best_epoch} (the best) are kept."
    ) in texts
    assert result.meta["phases"][0]["early_stopped"] == {
        "after_epoch": result.epochs_run,
        "best_epoch": best_epoch,
    }


def _marked(n_channels: int, size: int = 32) -> np.ndarray:
    """``(C, Y, X)`` uint16 planes: channel k has a bright square in row band k, on noise."""
    rng = np.random.default_rng(n_channels)
    planes = rng.integers(100, 200, (n_channels, size, size)).astype(np.uint16)
    for k in range(n_channels):
        planes[k, 2 + 7 * k : 7 + 7 * k, 10:20] = 4000
    return planes


def test_multichannel_pages_keep_their_channels_through_reading_and_preprocessing(tmp_path):
    tifffile.imwrite(tmp_path / "c4.tif", _marked(4), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(_marked(3), 0, -1), photometric="rgb")
    tifffile.imwrite(tmp_path / "c2.tif", _marked(2), imagej=True, metadata={"axes": "CYX"})
    page = read_page(tmp_path / "c4.tif")
    assert page.shape == (32, 32, 4)

    def band(plane, k):  # mean of channel k's square minus the rest
        return plane[2 + 7 * k : 7 + 7 * k, 10:20].mean() - plane.mean()

    out = preprocess(page, PreprocessSpec(32, channel_map=(3, None, 1)))
    assert band(out[..., 0], 3) > 100 and band(out[..., 2], 1) > 100
    assert not out[..., 1].any()  # "-" is black
    auto = preprocess(read_page(tmp_path / "c2.tif"), PreprocessSpec(32))
    assert band(auto[..., 0], 0) > 100 and band(auto[..., 1], 1) > 100
    assert not auto[..., 2].any()  # two channels: (0, 1, black)
    rgb = preprocess(read_page(tmp_path / "rgb.tif"), PreprocessSpec(32))
    assert all(band(rgb[..., k], k) > 100 for k in range(3))


def test_channels_option_trains_and_predicts_multichannel_images(tmp_path, capsys):
    data = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for cls, k in (("green", 1), ("red", 0)):  # the class is which channel has the square
        (data / cls).mkdir(parents=True)
        for i in range(10):
            n = (2, 3, 4)[i % 3]
            planes = rng.integers(100, 200, (n, 32, 32)).astype(np.uint16)
            y, x = rng.integers(4, 20, 2)
            planes[k, y : y + 8, x : x + 8] = 3000
            if n == 3:  # RGB samples in a plane
                tifffile.imwrite(
                    data / cls / f"{i}.tif", np.moveaxis(planes, 0, -1), photometric="rgb"
                )
            else:  # channels as planes (ImageJ)
                tifffile.imwrite(
                    data / cls / f"{i}.tif", planes, imagej=True, metadata={"axes": "CYX"}
                )
    out = tmp_path / "model"
    assert (
        cli_main(
            [
                "train",
                str(data),
                "--out",
                str(out),
                "--channels",
                "1,0,-",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--image-size",
                "32",
                "--backbone",  # frozen, the head on cached features: seconds
                "efficientnet-lite0",
                "--weights",
                "imagenet",
                "--no-augment",
            ]
        )
        == 0
    )
    meta = json.loads((out / "microclf.json").read_text())
    assert meta["preprocessing"]["channel_map"] == [1, 0, None]
    predictor = Predictor(out)
    assert predictor.spec.channel_map == (1, 0, None)
    tifffile.imwrite(tmp_path / "new.tif", _marked(4), imagej=True, metadata={"axes": "CYX"})
    (pred,) = predictor.predict_file(tmp_path / "new.tif")
    assert pred.class_name in ("green", "red") and sorted(pred.probabilities) == ["green", "red"]
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    capsys.readouterr()
    # a gray image has no channel 1: named before any TensorFlow work
    tifffile.imwrite(data / "red" / "gray.tif", np.zeros((32, 32), np.uint16))
    assert (
        cli_main(
            [
                "train",
                str(data),
                "--out",
                str(tmp_path / "m2"),
                "--channels",
                "1,0,-",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--weights",
                "none",
                "--fine-tune",
                "all",
            ]
        )
        == 1
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "microclf: error: red/gray.tif: 1 channel(s), but the channel map 1,0,- uses channel 1"
    )


def test_resplit_from_the_command_line_draws_a_new_split_and_says_so(tmp_path, capsys):
    data = make_sample_dataset(tmp_path / "ds", n_per_class=10, size=32)
    args = [
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--backbone",
        "efficientnet-lite0",
        "--weights",
        "imagenet",
        "--no-augment",
    ]
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m1"), *args]) == 0
    first = json.loads((data / "split.json").read_text())["assignments"]
    assert "New split" not in capsys.readouterr().out
    assert (
        cli_main(
            ["train", str(data), "--out", str(tmp_path / "m3"), "--seed", "5", "--resplit", *args]
        )
        == 0
    )
    printed = capsys.readouterr().out
    second = json.loads((data / "split.json").read_text())
    assert second["seed"] == 5 and second["assignments"] != first
    assert sorted(second["assignments"]) == sorted(first)  # the same files, drawn again
    assert f"New split: {data / 'split.json'} was drawn again (seed 5," in printed
    assert "Reusing the split" not in printed
    # the bundle keeps the split it was trained on
    kept = json.loads((tmp_path / "m3" / "split.json").read_text())
    assert {e["key"] for e in kept["test"]} == {
        k for k, s in second["assignments"].items() if s == "test"
    }
