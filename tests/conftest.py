"""Shared test set-up: the order of OpenGL and TensorFlow.

On Linux with Mesa OpenGL (Xvfb's llvmpipe included) Mesa and TensorFlow each bring an LLVM.
napari works when the OpenGL driver is loaded first and TensorFlow after it, through
``ensure_tensorflow`` (RTLD_DEEPBIND; see ``napari_microclf/_qt/_tf.py``), which is the
order of a real napari session. Some core test modules import Keras at collection, so before
collection (and after pytest-xvfb has started the display) an OpenGL context is made once
and TensorFlow imported the safe way.
"""

import gc
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never touch the network: weights="auto" does not try to download B0's ImageNet file.
os.environ["MICROCLF_OFFLINE"] = "1"
# The tests of prediction, training and the widgets run their models on TensorFlow, as
# before the OpenVINO engine: that engine converts each new model once (seconds), and its
# numbers equal TensorFlow's within 1e-4, which tests/test_engine.py checks, with training,
# prediction, the CLI and the widgets' setting on OpenVINO. MICROCLF_ENGINE=auto (or
# openvino) runs the whole suite on OpenVINO.
os.environ.setdefault("MICROCLF_ENGINE", "tensorflow")
# ... nor the user's remembered widget settings (_qt/_settings.py): before any fixture, a
# throw-away file for the session; each test gets its own (below).
os.environ["MICROCLF_SETTINGS"] = str(
    Path(tempfile.mkdtemp(prefix="microclf-settings-")) / "settings.json"
)


@pytest.fixture(autouse=True)
def _collect_then_freeze():
    """Collect the previous test's garbage, then freeze what survives: napari's viewer
    fixture runs full collections, which would otherwise walk every object TensorFlow and
    the session's models ever made (5-6 s each, late in the suite, against 0.4 s)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _settings_in_tmp(tmp_path, monkeypatch):
    """Each test's widgets remember their settings in its tmp_path, never in the user's
    config folder, and start from the defaults."""
    monkeypatch.setenv("MICROCLF_SETTINGS", str(tmp_path / "microclf-settings.json"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    from napari_microclf._qt._tf import ensure_tensorflow

    try:
        from napari.qt import get_qapp
        from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

        app = get_qapp()
        surface = QOffscreenSurface()
        surface.create()
        context = QOpenGLContext()
        if context.create() and context.makeCurrent(surface):
            context.doneCurrent()
        config._microclf_gl = (app, surface, context)  # keep them alive
    except Exception as exc:  # noqa: BLE001 - no display: nothing to order
        config._microclf_gl = exc
    ensure_tensorflow()


# -- trained models shared by the whole session ---------------------------------------------
# A test trains only when training is what it tests; the others read one of these models.
# They are read-only: a test that changes a bundle or its dataset works on `copy_of(...)`.


@dataclass(frozen=True)
class Trained:
    """A training shared by the session: its config and result, every update it sent, the
    sample it trained on (``dataset``, ``stack``, ``stack_labels``) and its files per subset."""

    config: object
    result: object
    updates: list
    sample: dict
    files: dict

    @property
    def bundle(self) -> Path:
        return self.result.bundle

    @property
    def dataset(self) -> Path:
        return self.sample["dataset"]


def _trained(sample: dict, out: Path, **settings) -> Trained:
    from napari_microclf.core.train import TrainConfig, train

    updates = []
    config = TrainConfig(str(sample["dataset"]), str(out), **settings)
    result = train(config, updates.append)
    split = json.loads((result.bundle / "split.json").read_text())
    files = {s: [sample["dataset"] / e["key"] for e in split[s]] for s in ("train", "val", "test")}
    return Trained(config, result, updates, sample, files)


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> dict:
    """The synthetic sample, small: 3 classes of 12 images (48 px) and a 12-page stack."""
    from napari_microclf.core.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("small-sample"), n_per_class=12, size=48, seed=1)


@pytest.fixture(scope="session")
def scratch(small_sample, tmp_path_factory) -> Trained:
    """A tiny model trained from scratch: EfficientNet-B0 from a random start, the whole
    network trained for one epoch at 32 px (a few eager steps). Mechanics, not accuracy."""
    return _trained(
        small_sample,
        tmp_path_factory.mktemp("scratch") / "model",
        epochs=1,
        batch_size=8,
        image_size=32,
        weights=None,
        fine_tune="all",
        augment=False,
        early_stopping=False,
        seed=0,
    )


@pytest.fixture(scope="session")
def lite0(tmp_path_factory) -> Trained:
    """The defaults on this offline machine (ImageNet EfficientNet-Lite0, frozen, its head
    on cached features) at 64 px, 40 images per class: a model that is right."""
    from napari_microclf.core.sample import write_sample

    root = tmp_path_factory.mktemp("lite0")
    sample = write_sample(root / "sample", n_per_class=40, size=96, seed=0)
    return _trained(
        sample, root / "model", image_size=64, epochs=5, learning_rate=1e-3, batch_size=16
    )


def copy_of(path: Path, into: Path) -> Path:
    """A private copy of a shared dataset or bundle folder, for a test that changes it."""
    return Path(shutil.copytree(path, Path(into) / Path(path).name))


@pytest.fixture
def private_copy(tmp_path):
    """``private_copy(folder)``: :func:`copy_of` into this test's ``tmp_path``."""
    return lambda path: copy_of(path, tmp_path)


@pytest.fixture(scope="session")
def client():
    """A 2-worker local Dask cluster, started once (its workers import TensorFlow)."""
    from napari_microclf.core.cluster import connect

    c = connect("local:2")
    yield c
    c.close()


# -- the widgets as napari docks them --------------------------------------------------------
# napari hands a docked plugin widget a PublicOnlyProxy of the viewer (and of every napari
# object reached through it: each `viewer.layers[name]` is a new proxy), not the viewer.
# Widget tests dock through the manifest, so they see what the user's widgets see.

WIDGET_NAMES = {
    "Annotate": "Annotate",
    "Train": "Train",
    "Predict": "Predict",
    "Review": "Review errors",
    "Label next": "Label next",
    "All": "Microscopy Classifier",
}


@pytest.fixture
def docked():
    """``docked(viewer, "Train")``: the widget napari made and docked through the manifest
    (``viewer.window.add_plugin_dock_widget``), given a proxy of ``viewer``. Names: Annotate,
    Train, Predict, Review, Label next, All (the tabs)."""

    def dock(viewer, name: str):
        _, widget = viewer.window.add_plugin_dock_widget(
            "napari-microclf", WIDGET_NAMES.get(name, name)
        )
        from napari.utils._proxies import PublicOnlyProxy

        assert isinstance(widget.viewer, PublicOnlyProxy)  # what napari really hands it
        return widget

    return dock
