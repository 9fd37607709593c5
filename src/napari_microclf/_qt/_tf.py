"""Import TensorFlow safely inside a running napari.

On Linux with Mesa OpenGL (llvmpipe under Xvfb, and the radeonsi/iris drivers of many
workstations) napari's canvas loads the system ``libLLVM``. TensorFlow links its own LLVM,
and importing it after the canvas exists then crashes the process (segmentation fault in
``import tensorflow``), whatever the thread. Loading TensorFlow's libraries with
``RTLD_DEEPBIND`` makes them resolve their own symbols first, which avoids the clash.

The widgets that need TensorFlow call :func:`ensure_tensorflow` when they are built, in the
main thread, as stardist-napari delays its TensorFlow import until a widget is built.
"""

from __future__ import annotations

import os
import sys


def _system_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


def ensure_tensorflow() -> None:
    """Import TensorFlow now (a few seconds, once), with RTLD_DEEPBIND where needed."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    deepbind = (
        sys.platform.startswith("linux") and hasattr(os, "RTLD_DEEPBIND") and _system_llvm_loaded()
    )
    old = sys.getdlopenflags() if deepbind else None
    try:
        if deepbind:
            sys.setdlopenflags(old | os.RTLD_DEEPBIND)
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        if deepbind:
            sys.setdlopenflags(old)
    from ..core.device import configure_gpus

    configure_gpus()  # before anything touches a GPU: napari's canvas keeps its share
