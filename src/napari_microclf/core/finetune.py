"""Fine-tuning's phase 2 on a CPU: the frozen stages run once, the open stages train alone.

Fine-tuning the top ``n`` stages of a pretrained EfficientNet leaves its lower stages frozen:
they compute the same activations for an image in every epoch. So their output (the
*boundary*, e.g. 14 x 14 x 112 before Lite0's stage 6) is computed once per training image
and view, kept as float16 (in memory, or in an anonymous temporary file when large), and the
open stages with the head train on it: an epoch costs the open stages only (measured on this
2-core CPU, Lite0 at 224 px, top 2 stages: 129 images/s in training, against about 20 for
the whole network; see docs/validity.md).

Each training image has ``views`` cached views: view 0 is the image, view ``k`` its ``k``-th
symmetry of the square (90-degree rotations and their mirror images: a microscope has no
"up") with a random crop of 85-100 % of its area and brightness and contrast of
±``strength``; each epoch draws one view per image.

The schedule (:class:`WarmupCosine`) warms the learning rate up linearly, then decays it
along a cosine to zero; with a time budget it sets the number of epochs from the first
epoch's measured time. :func:`smoothed_loss` is cross-entropy with label smoothing on integer
labels. TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import math
import re
import tempfile
import time

import numpy as np

from .model import N_STAGES, base_layer

# activations kept in memory up to this size; beyond it, in an anonymous temporary file
IN_MEMORY_BYTES = 4 << 30
CROP_AREA = (0.85, 1.0)  # the views' random crop, as a fraction of the image's area


def parse_duration(text) -> float | None:
    """Seconds of ``"30m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a plain number of minutes
    (``"45"``); None for None or ``""``. Raises ValueError with the accepted forms."""
    if text is None or str(text).strip() in ("", "none"):
        return None
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s) * 60
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(
            f"time budget must look like 30m, 1h30m, 90s or a number of minutes, got {text!r}"
        )
    unit = {"h": 3600, "min": 60, "m": 60, "s": 1}
    seconds = sum(float(n) * unit[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"time budget must be positive, got {text!r}")
    return seconds


def boundary_of(model, fine_tune: int):
    """The tensor between the frozen stages and the top ``fine_tune`` (1..6) open ones."""
    if not 1 <= fine_tune < N_STAGES:
        raise ValueError(f"cached activations need 1..{N_STAGES - 1} open stages, got {fine_tune}")
    prefix = f"block{N_STAGES - fine_tune + 1}a"
    base = base_layer(model)
    first = next(layer for layer in base.layers if layer.name.startswith(prefix))
    return first.input


def split_classifier(model, fine_tune: int):
    """``(lower, top)``: the frozen stages (image -> boundary activations) and the open
    stages with the classifier's pooling, dropout and predictions (activations -> classes).

    Both share the classifier's layers: training ``top`` trains the classifier, and
    ``top(lower(x))`` is the classifier's ``x`` (without its augmentation layers).
    """
    import keras

    base = base_layer(model)
    boundary = boundary_of(model, fine_tune)
    lower = keras.Model(base.input, boundary, name="frozen_stages")
    upper = keras.Model(boundary, base.output, name="open_stages")
    x = keras.Input(tuple(boundary.shape[1:]), name="activations")
    h = upper(x, training=False)  # BatchNorm as in the classifier (see model.build_classifier)
    for name in ("avg_pool", "dropout", "predictions"):
        h = model.get_layer(name)(h)
    return lower, keras.Model(x, h, name="top")


def make_views(strength: float, seed: int):
    """``view(images, k)``: the ``k``-th cached view of a batch of float images in
    [0, 255] (see the module's docstring); ``k = 0`` is the batch itself. ``k`` may be a
    tensor (one traced function serves every view)."""
    import tensorflow as tf

    gen = tf.random.Generator.from_seed(seed)

    def transformed(x, k):
        n, size = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.image.rot90(x, k % 4)
        x = tf.cond((k // 4) % 2 == 1, lambda: tf.reverse(x, axis=[2]), lambda: x)
        side = tf.sqrt(gen.uniform([n], *CROP_AREA))
        y0 = gen.uniform([n]) * (1 - side)
        x0 = gen.uniform([n]) * (1 - side)
        boxes = tf.stack([y0, x0, y0 + side, x0 + side], axis=1)
        x = tf.image.crop_and_resize(x, boxes, tf.range(n), tf.stack([size, size]))
        bright = 1.0 + gen.uniform([n, 1, 1, 1], -strength, strength)
        contrast = 1.0 + gen.uniform([n, 1, 1, 1], -strength, strength)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        return tf.clip_by_value(((x - mean) * contrast + mean) * bright, 0.0, 255.0)

    def view(x, k):
        k = tf.convert_to_tensor(k, tf.int32)
        return tf.cond(k == 0, lambda: x, lambda: transformed(x, k))

    return view


def _empty(shape: tuple) -> np.ndarray:
    """A float16 array of ``shape``: in memory, or mapped on an anonymous temporary file
    (removed by the system when the array is gone) when over :data:`IN_MEMORY_BYTES`."""
    nbytes = int(np.prod(shape)) * 2
    if nbytes <= IN_MEMORY_BYTES:
        return np.empty(shape, np.float16)
    return np.memmap(
        tempfile.TemporaryFile(prefix="microclf-activations-"), np.float16, "w+", 0, shape
    )


def boundary_activations(
    source, lower, views: int, strength: float, seed: int, batch_size: int, on_batch=None
) -> np.ndarray | None:
    """``(pages, views, *boundary)`` float16 activations of a :class:`~.pipeline.PageSource`
    (view 0: the page itself). ``on_batch(images_done)`` is called after each
    batch; when it returns True the work stops and None is returned."""
    import tensorflow as tf

    out_shape = tuple(int(d) for d in lower.output.shape[1:])
    out = _empty((len(source), max(views, 1), *out_shape))
    view = make_views(strength, seed)
    size = source.spec.image_size
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([], tf.int32)]
    fn = tf.function(lambda x, k: lower(view(x, k), training=False), input_signature=spec)
    done = 0
    for chunk in source.chunks(batch_size):
        for k in range(max(views, 1)):
            out[done : done + len(chunk), k] = np.asarray(fn(chunk, k)).astype(np.float16)
        done += len(chunk)
        if on_batch is not None and on_batch(done):
            return None
    return out


def smoothed_loss(label_smoothing: float, n_classes: int):
    """Cross-entropy on integer labels whose one-hot targets are smoothed by
    ``label_smoothing`` (the true class ``1 - e + e / n``, the others ``e / n``)."""
    import keras
    from keras import ops

    if not label_smoothing:
        return "sparse_categorical_crossentropy"

    def loss(y_true, y_pred):
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n_classes)
        target = target * (1 - label_smoothing) + label_smoothing / n_classes
        return keras.losses.categorical_crossentropy(target, y_pred)

    return loss


def warmup_cosine(peak: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at ``step``: linear warm-up to ``peak``, then cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * peak * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def make_schedule(
    peak: float,
    warmup_epochs: int,
    first: int,
    last: int,
    steps: int,
    budget_s: float | None = None,
    t_start: float | None = None,
    reserve_s: float = 0.0,
    on_epochs=None,
):
    """A Keras callback that sets the learning rate before each batch (:func:`warmup_cosine`
    over epochs ``first+1..last``). With ``budget_s`` (seconds since ``t_start``, less
    ``reserve_s`` kept for what follows the training), the first epoch's time sets how
    many epochs fit; ``on_epochs(n, epoch_seconds)`` is told the new number."""
    import keras

    class WarmupCosine(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = last - first
            self.warmup = min(warmup_epochs, max(self.epochs - 1, 0))
            self._epoch = first

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch, self._t0 = epoch, time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            step = (self._epoch - first) * steps + batch
            lr = warmup_cosine(peak, step, self.warmup * steps, self.epochs * steps)
            self.model.optimizer.learning_rate.assign(lr)

        def on_epoch_end(self, epoch, logs=None):
            if budget_s is not None and epoch == first:
                seconds = time.perf_counter() - self._t0
                left = budget_s - (time.perf_counter() - t_start) - reserve_s
                fits = 1 + max(int(left // max(seconds, 1e-6)), 0)
                if fits < self.epochs:
                    self.epochs = fits
                    self.warmup = min(self.warmup, max(fits - 1, 0))
                if on_epochs is not None:
                    on_epochs(self.epochs, seconds)
            if epoch + 1 - first >= self.epochs:
                self.model.stop_training = True

    return WarmupCosine()
