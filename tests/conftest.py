"""Shared test set-up: the order of OpenGL and TensorFlow.

On Linux with Mesa OpenGL (Xvfb's llvmpipe included) Mesa and TensorFlow each bring an LLVM.
napari works when the OpenGL driver is loaded first and TensorFlow after it, through
``ensure_tensorflow`` (RTLD_DEEPBIND; see ``napari_microclf/_qt/_tf.py``), which is the
order of a real napari session. Some core test modules import Keras at collection, so before
collection (and after pytest-xvfb has started the display) an OpenGL context is made once
and TensorFlow imported the safe way.
"""

import os
import tempfile
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
