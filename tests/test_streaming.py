"""Streaming training (issue 11): full-image training reads pages from the files per batch,
never the whole set into memory, in the same shuffled order as before; a page that breaks
mid-training is named; two devices train like one (MirroredStrategy on logical CPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_microclf.core import images as images_mod
from napari_microclf.core import pipeline
from napari_microclf.core import tta as tta_mod
from napari_microclf.core.dataset import load_samples
from napari_microclf.core.errors import ImageReadError
from napari_microclf.core.images import PreprocessSpec, preprocess_refs
from napari_microclf.core.sample import write_sample
from napari_microclf.core.train import TrainConfig, train


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("sample"), n_per_class=20, size=48, seed=3)


def _refs(sample):
    return load_samples(sample["dataset"], 0.15, 0.15, 0).train


def test_pages_stream_as_decoded_in_a_new_seeded_order_each_epoch(sample):
    refs = _refs(sample)
    spec = PreprocessSpec(32)
    source = pipeline.PageSource(refs, spec)
    labels = np.asarray([r.label for r in refs], np.int32)
    x_all = preprocess_refs(refs, spec)

    plain = list(source.dataset(5, labels))
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x, _ in plain]), x_all)
    np.testing.assert_array_equal(np.concatenate([np.asarray(y) for _, y in plain]), labels)

    order = pipeline.EpochOrder(len(refs), 7)
    ds = source.dataset(5, labels, order)
    first = np.concatenate([np.asarray(x) for x, _ in ds])
    order.epoch = 1  # what training's callback does when epoch 2 begins
    second = np.concatenate([np.asarray(x) for x, _ in ds])
    other = pipeline.EpochOrder(len(refs), 7)
    again = np.concatenate([np.asarray(x) for x, _ in source.dataset(5, labels, other)])
    np.testing.assert_array_equal(first, x_all[pipeline.EpochOrder(len(refs), 7)()])
    np.testing.assert_array_equal(again, first)  # the same seed and epoch, the same order
    assert not np.array_equal(first, x_all) and not np.array_equal(first, second)
    assert sorted(map(bytes, second)) == sorted(map(bytes, x_all))  # every page once


def test_gather_dataset_reads_a_memory_mapped_file_by_batch(tmp_path):
    feats = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float32, (23, 3, 4))
    feats[:] = np.arange(23 * 3 * 4, dtype=np.float32).reshape(23, 3, 4)
    feats.flush()
    ro = np.load(tmp_path / "f.npy", mmap_mode="r")
    labels = np.arange(23, dtype=np.int32)
    batches = list(pipeline.gather_dataset(ro, labels, 8, pipeline.EpochOrder(23, 1), 2))
    assert [len(y) for _, y in batches] == [8, 8, 7]
    seen = np.concatenate([np.asarray(y) for _, y in batches])
    assert sorted(seen) == list(range(23)) and list(seen) != list(range(23))
    for x, y in batches:  # each row is one of the views of its own image
        for row, i in zip(np.asarray(x), np.asarray(y), strict=True):
            assert any(np.array_equal(row, ro[i, v]) for v in range(3))


@pytest.mark.parametrize("memory_mb", ["0", None])
def test_full_image_training_never_decodes_a_whole_subset(sample, tmp_path, monkeypatch, memory_mb):
    """Fine-tuning reads pages per batch (tf.data) and evaluates in chunks of 8 batches. With
    no page memory every epoch reads its pages from the files; with the default budget (far
    above these few pages) each page is decoded once for the whole training."""
    sizes, decoded = [], []
    real_refs, real_decode = images_mod.preprocess_refs, pipeline.PageSource.decode

    def counting_refs(refs, *a, **k):
        sizes.append(len(refs))
        return real_refs(refs, *a, **k)

    def counting_decode(self, i):
        decoded.append(int(i))
        return real_decode(self, i)

    if memory_mb is None:
        monkeypatch.delenv("MICROCLF_PAGE_MEMORY_MB", raising=False)
        assert pipeline.page_memory_budget() > 1 << 20
    else:
        monkeypatch.setenv("MICROCLF_PAGE_MEMORY_MB", memory_mb)
    monkeypatch.setattr(images_mod, "preprocess_refs", counting_refs)
    monkeypatch.setattr(pipeline, "preprocess_refs", counting_refs)
    monkeypatch.setattr(tta_mod, "preprocess_refs", counting_refs)  # the test set, in chunks
    monkeypatch.setattr(pipeline.PageSource, "decode", counting_decode)
    config = TrainConfig(
        str(sample["dataset"]),
        str(tmp_path / "m"),
        epochs=2,
        batch_size=4,
        image_size=32,
        backbone="efficientnet-lite0",  # frozen, images through the base each batch (no
        weights="imagenet",  # cache): the pipeline of fine-tuning at a fraction of its cost
        cache=False,
        early_stopping=False,
        seed=1,
    )
    result = train(config)
    assert result.bundle is not None and result.report["n"] > 0
    assert not result.meta["cached_features"]
    samples = load_samples(sample["dataset"], config.val_split, config.test_split, config.seed)
    n_train, n_val = len(samples.train), len(samples.val)
    epochs_reading = 2 if memory_mb == "0" else 1
    assert len(decoded) == epochs_reading * (n_train + n_val)
    assert sizes and max(sizes) <= pipeline.CHUNK_BATCHES * config.batch_size < n_train


def test_a_page_broken_during_training_is_named(sample, tmp_path, monkeypatch):
    import shutil

    from napari_microclf.core import train as train_mod

    data = tmp_path / "data"
    shutil.copytree(sample["dataset"], data)
    victim = load_samples(data, 0.15, 0.15, 1).train[0].path
    real_images = train_mod._images

    def images_then_break(config, samples):  # readable when checked, broken when read
        sources = real_images(config, samples)
        Path(victim).write_bytes(b"not a tiff any more")
        return sources

    monkeypatch.setattr(train_mod, "_images", images_then_break)
    config = TrainConfig(
        str(data),
        str(tmp_path / "m"),
        epochs=1,
        batch_size=4,
        image_size=32,
        weights=None,
        fine_tune="all",
        seed=1,
    )
    with pytest.raises(ImageReadError, match=victim.name):
        train(config)
    assert not (tmp_path / "m").exists()


def test_devices_setting_is_checked_before_training(sample, tmp_path):
    with pytest.raises(ValueError, match="devices must be"):
        TrainConfig(str(sample["dataset"]), devices="gpu0")
    from napari_microclf.core.errors import DeviceError

    config = TrainConfig(
        str(sample["dataset"]), str(tmp_path / "m"), epochs=1, image_size=32, devices="0,7"
    )
    with pytest.raises(DeviceError, match="device 7 does not exist"):
        train(config)


MIRRORED = """
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from napari_microclf.core import model as model_mod
from napari_microclf.core.train import TrainConfig, Message, train

# Stochastic depth (the unfrozen stages' *_drop layers) draws its own random numbers on each
# replica; with it off both runs compute the same function of the same batches.
real_set_fine_tune = model_mod.set_fine_tune


def set_fine_tune(model, *args, **kwargs):
    real_set_fine_tune(model, *args, **kwargs)
    for layer in model_mod.base_layer(model).layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


model_mod.set_fine_tune = set_fine_tune

out = {}
for devices in ("0", "all"):
    said = []
    result = train(
        TrainConfig(
            sys.argv[1], sys.argv[2] + "/" + devices.replace(",", "-"), epochs=1,
            batch_size=8, image_size=32, weights="auto", fine_tune=1, head_epochs=0,
            augment=False, dropout=0.0, early_stopping=False, class_weights=False, seed=4,
            devices=devices,
        ),
        lambda u: said.append(u.text) if isinstance(u, Message) else None,
    )
    out[devices] = {
        "loss": result.history["loss"][0],
        "said": [t for t in said if "MirroredStrategy" in t],
        "left_out": [t for t in said if "left out of validation" in t],
        "tested": result.report["n"],
    }
print("RESULT", json.dumps(out))
"""


def test_two_devices_give_the_first_epoch_loss_of_one(sample, tmp_path):
    """MirroredStrategy over two logical CPU devices: same batches (split 4 + 4), same
    learning rate, BatchNorm frozen in fine-tuning, so the same loss up to float sums
    (stochastic depth off: its random draws differ per replica), also where a subset does
    not split evenly across the devices."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED), str(sample["dataset"]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["0"]["said"] == []  # one device: no strategy
    assert len(out["all"]["said"]) == 1 and "2 devices" in out["all"]["said"][0]
    assert "split 4 per device" in out["all"]["said"][0]
    assert out["all"]["loss"] == pytest.approx(out["0"]["loss"], rel=1e-4)
    # 9 validation and 9 test images in batches of 8: a last batch of one image cannot give
    # each device one (TensorFlow fails on an empty share). Validation leaves it out and
    # says so; the test set is scored whole.
    samples = load_samples(sample["dataset"], 0.15, 0.15, 4)
    assert len(samples.val) % 8 == 1 and len(samples.test) % 8 == 1
    assert out["0"]["left_out"] == []
    assert out["all"]["left_out"] == [
        f"The last 1 of {len(samples.val)} validation images are left out of validation: "
        "a batch must give each of the 2 devices an image."
    ]
    assert out["all"]["tested"] == out["0"]["tested"] == len(samples.test)


def test_head_training_on_memory_mapped_features(sample, tmp_path, monkeypatch):
    """A large feature set (here: any, threshold 0) is memory-mapped and the head training
    gathers its batches from the file: same pipeline, a working model."""
    from napari_microclf.core import train as train_mod

    monkeypatch.setenv("MICROCLF_MEMMAP_MB", "0")
    fed = {}
    real_gather = pipeline.gather_dataset

    def spy(features, *a, **k):
        fed.setdefault("types", []).append(type(features))
        return real_gather(features, *a, **k)

    monkeypatch.setattr(train_mod, "gather_dataset", spy)
    config = TrainConfig(
        str(sample["dataset"]),
        str(tmp_path / "m"),
        epochs=2,
        batch_size=4,
        image_size=32,
        weights=None,
        views=1,
        seed=1,
    )
    result = train_mod.train(config)
    assert result.bundle is not None and result.report["accuracy"] is not None
    assert fed["types"] and all(issubclass(t, np.memmap) for t in fed["types"])
    assert list((sample["dataset"] / ".microclf-cache").rglob("assembled-*.npy"))
