"""Test-time augmentation, and a Keras model's probabilities over a list of pages.

Test-time augmentation (``tta=True``) classifies each page as itself and its three flips
(:func:`flip_views`) in one forward pass and averages the four probability vectors
(:func:`mean_of_views`). The :class:`~.predictor.Predictor` does it batch by batch;
:func:`model_probabilities` runs a whole model over page references in chunks, with or
without flips, for the test-set evaluation (:mod:`.evaluate`) and for the report at the end
of a training (:mod:`.train`), which therefore share it without importing each other.
"""

from __future__ import annotations

import numpy as np

from .device import predict_padded
from .images import preprocess_refs
from .predict_options import DEFAULTS

TTA_VIEWS = 4  # the page, its horizontal flip, its vertical flip and both flips


def flip_views(x: np.ndarray) -> np.ndarray:
    """``(B, H, W, C)`` model input as its :data:`TTA_VIEWS` flipped views, ``(4B, H, W, C)``.

    Rows ``0..B-1`` are ``x`` itself, then its horizontal flips (mirrored left-right), its
    vertical flips (upside down) and both (a 180-degree turn): view ``v`` of page ``i`` is row
    ``v * B + i``. Model input is square, so each view has the input's shape.
    """
    x = np.asarray(x)
    return np.concatenate([x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]])


def mean_of_views(probs: np.ndarray, n_views: int = TTA_VIEWS) -> np.ndarray:
    """The probabilities of :func:`flip_views`' ``(4B, K)`` rows averaged per page: ``(B, K)``."""
    probs = np.asarray(probs)
    return probs.reshape(n_views, len(probs) // n_views, *probs.shape[1:]).mean(axis=0)


# Keras ``predict`` traces the model once (seconds for EfficientNet on a CPU), then runs a
# batch faster than an eager call, which spends about half a second in Python per call: a
# few batches (a typical test set) run eagerly, more through ``predict``.
EAGER_PASSES = 8


def uses_eager(model, n_images: int, batch_size: int) -> bool:
    """Whether :func:`tta_probabilities` should call ``model`` eagerly for ``n_images``: a
    few forward passes, and no ``predict`` function traced already."""
    passes = -(-int(n_images) // max(int(batch_size), 1))
    return passes <= EAGER_PASSES and getattr(model, "predict_function", None) is None


def tta_probabilities(
    model,
    x: np.ndarray,
    batch_size: int = DEFAULTS.batch_size,
    *,
    with_plain: bool = False,
    eager: bool | None = None,
):
    """A Keras classifier's probabilities for ``x`` ``(N, H, W, 3)`` averaged over the four
    flipped views of each image (test-time augmentation).

    Runs ``batch_size`` images (``4 * batch_size`` views) per forward pass, in inference
    mode (augmentation layers off), so memory is bounded by the batch. ``eager``: call the
    model directly rather than through Keras ``predict`` (default: :func:`uses_eager`).
    Returns ``(N, n_classes)``; with ``with_plain`` also the unflipped views' own
    probabilities (the plain prediction, at no extra cost): ``(tta, plain)``.
    """
    x = np.asarray(x, dtype=np.float32)
    step = max(int(batch_size), 1)
    if eager is None:
        eager = uses_eager(model, len(x), step)
    empty = np.zeros((0, *model.output_shape[1:]), np.float32)
    mean, plain = [empty], [empty]
    for i in range(0, len(x), step):
        views = flip_views(x[i : i + step])
        probs = (
            np.asarray(model(views, training=False))
            if eager
            else model.predict(views, batch_size=len(views), verbose=0)
        )
        mean.append(mean_of_views(probs))
        plain.append(probs[: len(views) // TTA_VIEWS])
    if with_plain:
        return np.concatenate(mean), np.concatenate(plain)
    return np.concatenate(mean)


def model_probabilities(
    model, spec, refs, batch_size: int = DEFAULTS.batch_size, tta: bool = DEFAULTS.tta, forward=None
):
    """The full ``model``'s probabilities for the pages ``refs``, preprocessed with ``spec``
    and run in chunks of ``8 * batch_size`` pages: ``(probabilities, plain)``. With ``tta``
    each page's probabilities are the mean over its four flipped views
    (:func:`tta_probabilities`) and ``plain`` the unflipped views' (same pass);
    without, both are the plain probabilities. ``forward``: the model as another engine runs
    it (:func:`~.engine.classifier_forward`), used instead of ``model``."""
    if forward is not None:
        out, plain = [], []
        for i in range(0, len(refs), max(batch_size, 1)):
            x = preprocess_refs(refs[i : i + batch_size], spec)
            probs = forward(flip_views(x) if tta else x)[0]
            out.append(mean_of_views(probs) if tta else probs)
            plain.append(probs[: len(x)])
        if not out:
            k = forward(np.zeros((0, spec.image_size, spec.image_size, 3), np.float32))[0]
            return k, k
        return np.concatenate(out), np.concatenate(plain)

    empty = np.zeros((0, *model.output_shape[1:]), np.float32)
    out, plain = [empty], [empty]
    chunk = max(batch_size, 1) * 8
    eager = uses_eager(model, len(refs), batch_size)
    for i in range(0, len(refs), chunk):
        x = preprocess_refs(refs[i : i + chunk], spec)
        if tta:
            mean, unflipped = tta_probabilities(model, x, batch_size, with_plain=True, eager=eager)
            out.append(mean)
            plain.append(unflipped)
        else:
            out.append(predict_padded(model, x, batch_size))
            plain.append(out[-1])
    return np.concatenate(out), np.concatenate(plain)
