"""The device TensorFlow uses: memory growth on for every GPU, and the line the Train widget
shows (GPUs faked here: this machine has none)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_microclf.core import device


@pytest.fixture
def fake_gpus(monkeypatch):
    import tensorflow as tf

    gpus = [
        SimpleNamespace(name="/physical_device:GPU:0"),
        SimpleNamespace(name="/physical_device:GPU:1"),
    ]
    grown = []
    monkeypatch.setattr(device, "_gpus", lambda: gpus)
    monkeypatch.setattr(
        tf.config.experimental, "set_memory_growth", lambda gpu, on: grown.append((gpu.name, on))
    )
    monkeypatch.setattr(
        tf.config.experimental, "get_device_details", lambda gpu: {"device_name": "NVIDIA H200"}
    )
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    return gpus, grown


def test_every_gpu_gets_memory_growth_and_is_named(fake_gpus):
    gpus, grown = fake_gpus
    assert device.configure_gpus() == 2
    assert grown == [(g.name, True) for g in gpus]
    assert device.describe_device() == "GPU: NVIDIA H200 (and 1 more), memory growth on"


def test_an_explicit_no_growth_setting_is_kept(fake_gpus, monkeypatch):
    _, grown = fake_gpus
    monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", "false")
    device.configure_gpus()
    assert grown == []


def test_this_cpu_machine_says_cpu(make_napari_viewer, docked):
    assert device.describe_device().startswith("CPU")
    widget = docked(make_napari_viewer(), "Train")
    assert widget.device.text() == f"Runs on: {device.describe_device()}"


def test_no_batch_leaves_a_device_without_an_image():
    """A batch shorter than the number of devices would leave one with an empty share
    (TensorFlow's oneDNN convolutions fail on it): fitting leaves such a remainder out,
    prediction pads it and drops the padding's answers."""
    import numpy as np

    assert device.even_count(9, 8, 2) == 8  # a last batch of 1 on 2 devices: left out
    assert device.even_count(10, 8, 2) == 10  # 2 on 2 devices: kept
    assert device.even_count(9, 8, 1) == 9  # one device takes any batch
    assert device.even_count(19, 8, 4) == 16 and device.even_count(20, 8, 4) == 20
    seen = []

    class TwoDevices:
        distribute_strategy = SimpleNamespace(num_replicas_in_sync=2)

        def predict(self, x, batch_size, verbose):
            seen.append(len(x))
            return x[:, :1] * 2

    x = np.arange(9, dtype=np.float32).reshape(9, 1)
    out = device.predict_padded(TwoDevices(), x, 8)
    assert seen == [10] and np.array_equal(out, x * 2)
    seen.clear()
    assert np.array_equal(device.predict_padded(TwoDevices(), x[:8], 8), x[:8] * 2)
    assert seen == [8]
