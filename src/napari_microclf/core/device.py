"""Where TensorFlow computes: GPUs with memory growth on, and a line naming the device.

By default TensorFlow reserves almost all of a GPU's memory the first time it touches it;
inside napari that starves the viewer's OpenGL canvas, and a second process (a Predict run
next to a training) fails to start. :func:`configure_gpus` turns memory growth on for every
visible GPU before TensorFlow initialises them (the widgets do it when they import
TensorFlow, ``train`` at its start). :func:`describe_device` is what the Train widget shows.
"""

from __future__ import annotations


def _gpus():
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def configure_gpus() -> int:
    """Memory growth on for every visible GPU; returns how many there are.

    A GPU TensorFlow has already initialised keeps the setting it started with (TensorFlow
    allows no change then); ``TF_FORCE_GPU_ALLOW_GROWTH=false`` in the environment is kept.
    """
    import os

    import tensorflow as tf

    gpus = _gpus()
    if os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "false":
        return len(gpus)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):  # already initialised
            pass
    return len(gpus)


def describe_device() -> str:
    """``"GPU: <name>"`` (the first, with the count when there are more) or ``"CPU ..."``."""
    import tensorflow as tf

    gpus = _gpus()
    if not gpus:
        return "CPU (TensorFlow sees no GPU)"
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    except (RuntimeError, ValueError):
        name = None
    more = f" (and {len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return f"GPU: {name or gpus[0].name}{more}, memory growth on"
