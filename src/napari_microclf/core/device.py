"""Where TensorFlow computes: GPUs with memory growth on, a line naming the device, the
devices a training is spread over (:func:`distribution`) and the memory available.

By default TensorFlow reserves almost all of a GPU's memory the first time it touches it;
inside napari that starves the viewer's OpenGL canvas, and a second process (a Predict run
next to a training) fails to start. :func:`configure_gpus` turns memory growth on for every
visible GPU before TensorFlow initialises them (the widgets do it when they import
TensorFlow, ``train`` at its start). :func:`describe_device` is what the Train widget shows.
"""

from __future__ import annotations

import contextlib
import os
import sys


def available_memory() -> int | None:
    """Bytes of memory available now (psutil's ``available``: free plus reclaimable cache),
    else the free pages the OS reports, else None."""
    try:
        import psutil  # a napari dependency
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not on Windows
        return None


@contextlib.contextmanager
def stderr_muted():
    """File descriptor 2 goes to the null device for the block: for TensorFlow's start-up
    lines (oneDNN, CUDA probing), written from C++ before any setting can silence them.
    Python errors still raise as usual; where stderr has no descriptor (inside pytest's
    capture, say) nothing is muted."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


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
        with contextlib.suppress(RuntimeError, ValueError):  # already initialised
            tf.config.experimental.set_memory_growth(gpu, True)
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


def parse_devices(spec: str | None) -> list[int] | None:
    """``"all"`` (or empty) → None (every device); ``"0,1"`` → ``[0, 1]``; else ValueError."""
    text = "all" if spec is None else str(spec).strip().lower()
    if text in ("", "all"):
        return None
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"devices must be 'all' or device numbers such as '0,1', got {spec!r}"
        ) from None
    if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(
            f"devices must be 'all' or distinct device numbers such as '0,1', got {spec!r}"
        )
    return indices


def training_devices(spec: str | None = "all") -> list[str]:
    """The devices a training runs on: the visible GPUs (``spec`` picks some by number) or,
    with no GPU, the CPU's logical devices (one unless the program configured more).

    Raises ValueError for a number beyond the devices TensorFlow sees, naming them.
    """
    import tensorflow as tf

    kind = "GPU" if _gpus() else "CPU"
    names = [d.name for d in tf.config.list_logical_devices(kind)]
    picked = parse_devices(spec)
    if picked is None:
        return names
    missing = [i for i in picked if i >= len(names)]
    if missing:
        raise ValueError(
            f"device {missing[0]} does not exist: TensorFlow sees {len(names)} "
            f"{kind} device(s) ({', '.join(names)}); use --devices all or numbers "
            f"0..{len(names) - 1}"
        )
    return [names[i] for i in picked]


def distribution(spec: str | None = "all"):
    """A ``tf.distribute.MirroredStrategy`` over :func:`training_devices` when there are two
    or more, else None (TensorFlow's default placement on the one device).

    Each replica gets an equal share of every batch and the gradients are summed across
    replicas, so a batch of 32 on two devices is one step of 32 images (16 each), at the same
    learning rate as on one device.
    """
    import tensorflow as tf

    devices = training_devices(spec)
    if len(devices) < 2:
        return None
    return tf.distribute.MirroredStrategy(devices)


# TensorFlow's oneDNN convolution gives an empty batch the wrong shape, so a replica of a
# MirroredStrategy that receives none of a short last batch fails ("Incompatible shapes:
# [32] vs. [0,64,64,3]" in the stem's BatchNorm). No batch may be shorter than the number of
# replicas: fitting leaves out such a remainder, prediction pads it.


def replicas(model=None) -> int:
    """How many replicas each batch is split across: ``model``'s strategy where given, else
    the current one (1 outside a MirroredStrategy)."""
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


def even_count(n: int, batch_size: int, n_replicas: int) -> int:
    """How many of ``n`` items to batch by ``batch_size`` so that every batch gives each of
    ``n_replicas`` replicas at least one: ``n`` less a last batch shorter than that.

    >>> even_count(9, 8, 2), even_count(10, 8, 2), even_count(9, 8, 1), even_count(1, 8, 2)
    (8, 10, 9, 0)
    """
    rest = n % max(int(batch_size), 1)
    return n - rest if 0 < rest < n_replicas else n


def predict_padded(model, x, batch_size: int):
    """``model.predict(x)``, with a last batch too short for every replica padded by copies
    of the last row (their outputs dropped)."""
    import numpy as np

    n, k = len(x), replicas(model)
    short = n - even_count(n, batch_size, k)
    if short:
        x = np.concatenate([x, np.repeat(x[-1:], k - short, axis=0)])
    return model.predict(x, batch_size=batch_size, verbose=0)[:n]
