"""Where the model looks: Grad-CAM heatmaps in the geometry of the page.

For each page, the pixels go through the bundle's own preprocessing (intensity, channels, pad
or stretch to the model's square), the classifier runs, and the gradient of the chosen
class's score (its logit, before the softmax) with respect to the backbone's last feature
map (``top_activation``, the same name for EfficientNetB0 and EfficientNet-Lite0) weighs
that map's channels (Selvaraju et al., 2017). The ReLU of the weighted sum, scaled to
[0, 1], is then mapped back onto the page: the padding of ``"pad"`` is cut away (or the
stretch of ``"stretch"`` undone) and the map is resized to the page's ``(Y, X)``, so it lies
on the image pixel for pixel.

The map has the resolution of the last feature map: 1/32 of the model's input side (7 x 7
cells for a 224 px model), smoothly interpolated. It says which region drove the decision,
not which pixels.

TensorFlow is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import MicroclfError, OutputError, one_line
from .images import ImageReadError, PreprocessSpec, array_pages, open_image, preprocess
from .model import base_layer
from .predictor import check_page

FEATURE_LAYER = "top_activation"  # the backbone's last feature map, in both backbones


class ClassNameError(MicroclfError, ValueError):
    """A class the model does not have; the message lists the ones it has."""


@dataclass(frozen=True)
class Explanation:
    """The Grad-CAM of one page.

    ``heatmap`` is float32 ``(Y, X)`` in [0, 1], aligned with the page; ``class_index`` is
    the class it explains, ``predicted`` the class the model chose, ``probabilities`` all
    of them (in the bundle's class order).
    """

    page: int
    heatmap: np.ndarray
    class_index: int
    class_name: str
    predicted: int
    predicted_name: str
    probabilities: np.ndarray

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.predicted])


def class_index_of(class_names: list[str], which) -> int | None:
    """``which`` (None, an index or a class name) as an index; ClassNameError if unknown."""
    if which is None or (isinstance(which, str) and which.strip() in ("", "predicted")):
        return None
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if 0 <= int(which) < len(class_names):
            return int(which)
        raise ClassNameError(
            f"class index {which} does not exist: the model has "
            f"{len(class_names)} classes (0..{len(class_names) - 1}: "
            f"{', '.join(class_names)})"
        )
    name = str(which).strip()
    if name in class_names:
        return class_names.index(name)
    folded = [n.lower() for n in class_names]
    if folded.count(name.lower()) == 1:
        return folded.index(name.lower())
    raise ClassNameError(
        f"the model has no class {name!r}; its classes are {', '.join(class_names)}"
    )


def to_page_geometry(
    cam: np.ndarray, page_shape: tuple[int, int], spec: PreprocessSpec
) -> np.ndarray:
    """A map over the model's square input (any resolution) to the page's ``(Y, X)``.

    Undoes :func:`~napari_microclf.core.images.resize_plane`: with ``"pad"`` the page sits,
    scaled by ``size / max(Y, X)``, centred in the square, so that region is cut out and
    resized to the page; with ``"stretch"`` the whole square is resized to the page.
    """
    from skimage.transform import resize

    size = spec.image_size
    h, w = int(page_shape[0]), int(page_shape[1])
    cam = np.asarray(cam, np.float32)
    if spec.resize_mode == "pad" and h != w:
        square = resize(cam, (size, size), order=1, preserve_range=True)
        long_side = max(h, w)
        sh, sw = max(1, round(h * size / long_side)), max(1, round(w * size / long_side))
        y0, x0 = (size - sh) // 2, (size - sw) // 2
        cam = square[y0 : y0 + sh, x0 : x0 + sw]
    out = resize(cam, (h, w), order=1, preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _scale(cam: np.ndarray) -> np.ndarray:
    """The ReLU of the map over its maximum (Selvaraju et al.): 0 is no evidence for the
    class, 1 the strongest; all zero when nothing speaks for it. A model of 32 px has a
    feature map of one cell: its maps are uniform (the whole page is the evidence)."""
    cam = np.maximum(np.asarray(cam, np.float32), 0.0)
    top = float(cam.max())
    return cam / top if top > 0 else np.zeros_like(cam)


class Explainer:
    """A loaded bundle ready to compute Grad-CAM heatmaps, one page at a time.

    Parameters
    ----------
    bundle : Bundle, str or Path
        A model folder written by training, or a loaded bundle.

    Examples
    --------
    >>> ex = Explainer("model")                                 # doctest: +SKIP
    >>> e = ex.explain(page)                                    # doctest: +SKIP
    >>> e.heatmap.shape == page.shape[:2], e.predicted_name     # doctest: +SKIP
    (True, 'round')
    """

    def __init__(self, bundle: Bundle | str | Path):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.class_names = self.bundle.class_names
        self.spec = self.bundle.preprocess
        self._fn = None

    def _build(self):
        """``(x, class or -1) -> (feature map, gradient of the class's logit, probabilities)``
        (-1: each page's predicted class).

        The classifier is ``input -> [augmentation] -> base -> head layers``: the base is run
        on its own (its output is the feature map) and the head layers are applied to that
        map in inference mode; the last layer's softmax is left out, so the scores are logits.
        """
        import keras
        import tensorflow as tf

        model = self.bundle.model
        base = base_layer(model)
        layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
        i = layers.index(base)
        before, head = layers[:i], layers[i + 1 :]
        last = head[-1]
        softmax = getattr(last, "activation", None) is keras.activations.softmax
        size = self.spec.image_size

        def forward(x, chosen):
            for layer in before:
                x = layer(x, training=False)
            with tf.GradientTape() as tape:
                features = base(x, training=False)
                tape.watch(features)
                y = features
                for layer in head[:-1]:
                    y = layer(y, training=False)
                if softmax:
                    logits = tf.matmul(y, last.kernel)
                    if last.use_bias:
                        logits = logits + last.bias
                    probs = tf.nn.softmax(logits)
                else:
                    probs = logits = last(y, training=False)
                # the probabilities' argmax, as prediction has it (ties: the first)
                predicted = tf.argmax(probs, axis=1, output_type=tf.int32)
                c = tf.where(chosen < 0, predicted, tf.fill(tf.shape(predicted), chosen))
                score = tf.reduce_sum(tf.gather(logits, c, axis=1, batch_dims=1))
            return features, tape.gradient(score, features), probs, c

        self._fn = tf.function(
            forward,
            reduce_retracing=True,
            input_signature=[
                tf.TensorSpec([None, size, size, 3], tf.float32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    def _prepare(self, array, page: int) -> np.ndarray:
        where = "image" if page == 0 else f"page {page}"
        page_array = check_page(array, where)
        try:
            return preprocess(page_array, self.spec)
        except ImageReadError as exc:
            raise ImageReadError(f"{where}: {one_line(exc)}") from exc

    def explain(self, array: np.ndarray, class_index=None, page: int = 0) -> Explanation:
        """Grad-CAM of one page (``(Y, X)`` or ``(Y, X, C)``) for ``class_index`` (an index,
        a class name, or None for the predicted class)."""
        chosen = class_index_of(self.class_names, class_index)
        array = np.asarray(array)
        x = self._prepare(array, page)
        if self._fn is None:
            self._build()
        features, grads, probs, used = (
            np.asarray(t) for t in self._fn(x[None], np.int32(-1 if chosen is None else chosen))
        )
        probs = probs[0]
        predicted = int(probs.argmax())
        c = int(used[0])
        fmap, grad = features[0], grads[0]  # (h, w, K)
        weights = grad.mean(axis=(0, 1))  # alpha_k: the gradient pooled over the map
        cam = _scale(np.tensordot(fmap, weights, axes=([2], [0])))
        # scaled again on the page: its own strongest evidence is 1 (the padding is gone
        # and the interpolation lowers the peaks of small maps)
        heat = _scale(to_page_geometry(cam, array.shape[:2], self.spec))
        return Explanation(
            int(page),
            heat,
            c,
            self.class_names[c],
            predicted,
            self.class_names[predicted],
            probs.astype(np.float32),
        )

    def explain_pages(
        self, pages: Iterable[tuple[int, np.ndarray]], class_index=None, should_stop=None
    ) -> Iterator[Explanation]:
        """Grad-CAM of ``(page number, array)`` items, one at a time."""
        chosen = class_index_of(self.class_names, class_index)
        for page, array in pages:
            yield self.explain(array, chosen, page)
            if should_stop is not None and should_stop():
                return


def gradcam(bundle, image_or_page, class_index=None, page_axis: int | None = None) -> np.ndarray:
    """Grad-CAM heatmaps of an image or a stack, in the geometry of its pages.

    Parameters
    ----------
    bundle : Explainer, Bundle, str or Path
        A model folder written by training (or a loaded bundle or Explainer).
    image_or_page : numpy.ndarray, str or Path
        An array: one page ``(Y, X)`` or ``(Y, X, C)`` with ``C <= 4`` when ``page_axis`` is
        None, else a stack whose pages lie along ``page_axis``. A file: every page of it.
    class_index : int, str or None
        The class to explain (an index or a class name); None: each page's predicted class.
    page_axis : int, optional
        For arrays only: the axis that enumerates pages.

    Returns
    -------
    numpy.ndarray
        float32 in [0, 1]: ``(Y, X)`` for one page, ``(pages, Y, X)`` for a stack or a file
        (a one-page file gives ``(1, Y, X)``). 1 marks where the class's evidence is
        strongest.

    Raises
    ------
    ClassNameError
        A class the model does not have (the message lists its classes).
    ImageReadError
        An array that is not one page without ``page_axis``, or a page too small.

    Examples
    --------
    >>> heat = gradcam("model", page)                         # doctest: +SKIP
    >>> heat.shape == page.shape[:2], float(heat.max())        # doctest: +SKIP
    (True, 1.0)
    >>> gradcam("model", stack, "round", page_axis=0).shape    # doctest: +SKIP
    (12, 300, 400)
    """
    explainer = bundle if isinstance(bundle, Explainer) else Explainer(bundle)
    if isinstance(image_or_page, (str, Path)):
        return np.stack([e.heatmap for e in explain_file(explainer, image_or_page, class_index)])
    array = np.asarray(image_or_page)
    stack = array_pages(array, page_axis)
    if stack is None:
        return explainer.explain(array, class_index).heatmap
    return np.stack([e.heatmap for e in explainer.explain_pages(enumerate(stack), class_index)])


def explain_file(
    explainer: Explainer, path: str | Path, class_index=None, pages: Iterable[int] | None = None
) -> Iterator[Explanation]:
    """Grad-CAM of the pages of one image file (all, or ``pages``)."""
    with open_image(path) as f:
        numbers = range(len(f)) if pages is None else list(pages)
        for p in numbers:
            if not 0 <= p < len(f):
                raise ImageReadError(f"{path}: has {len(f)} page(s) (0..{len(f) - 1}), no page {p}")
        yield from explainer.explain_pages(((p, f.page(p)) for p in numbers), class_index)


def check_tiff_destination(path: str | Path) -> Path:
    """``path`` if a TIFF can be written there, else an OutputError saying what to do."""
    text = str(path).strip()
    if not text:
        raise OutputError("no output file given; choose where to write the heatmap TIFF")
    path = Path(text).expanduser()
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name, e.g. {path / 'heatmap.tif'}")
    if not path.parent.is_dir():
        raise OutputError(
            f"cannot write {path}: the folder {path.parent} does not exist; "
            "create it or choose another path"
        )
    return path


def write_heatmaps(path: str | Path, heatmaps: np.ndarray) -> Path:
    """Write float32 heatmaps (``(Y, X)`` or ``(pages, Y, X)``) as one TIFF, atomically."""
    import os

    import tifffile

    path = check_tiff_destination(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tifffile.imwrite(tmp, np.asarray(heatmaps, np.float32), photometric="minisblack")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
