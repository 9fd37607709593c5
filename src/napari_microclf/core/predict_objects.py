"""Objects classified one by one: every label of a segmentation, in its image, by a model
trained on object crops (:mod:`.objects`).

:func:`predict_objects` cuts each object's crop exactly as the model's training data was cut
(the crop settings in its ``microclf.json``), page by page and batch by batch: the crops of
a large stack are never all in memory. Each object gives an
:class:`~.results.ObjectPrediction` (class, confidence, probabilities, unfamiliar score, and
the object's label, centroid, area and box). A model of whole images is refused, and so is
an object model asked to classify whole images (:func:`check_model_kind`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np

from .errors import BundleError
from .images import array_pages, count_pages
from .objects import CropSpec, model_crop_spec, object_crops
from .predictor import Predictor
from .results import ObjectPrediction, PagePrediction


def check_model_kind(meta: dict, shown, objects: bool) -> CropSpec | None:
    """The model's crop settings when ``objects`` (labels given), else None; a BundleError
    when the model is of the other kind (trained on objects, asked for whole images, or the
    reverse)."""
    crop = model_crop_spec(meta)
    if objects and crop is None:
        raise BundleError(
            f"{shown} was trained on whole images, not on objects: it cannot classify the "
            "labels' objects; train one on object crops (microclf objects add) or leave out "
            "the labels"
        )
    if not objects and crop is not None:
        raise BundleError(
            f"{shown} classifies objects (crops {crop.describe()}): give the image's labels "
            "(--labels, or labels= in Python)"
        )
    return crop


_PAGE_FIELDS = [f.name for f in fields(PagePrediction)]


def predict_objects(
    predictor: Predictor | str | Path,
    image,
    labels,
    *,
    page_axis: int | None = None,
    tta: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
    empty_pages: list[int] | None = None,
) -> Iterator[ObjectPrediction]:
    """Classify every object of ``image`` (a path or an array; ``page_axis`` for an array
    stack) segmented by ``labels`` (a path or an integer array: one label page per image
    page, or one for all), in page and label order.

    ``empty_pages``: a list that receives the pages without any object (they give no rows).
    ``tta`` and ``should_stop``: see :meth:`~.predictor.Predictor.predict_pages`.
    """
    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor)
    bundle = predictor.bundle
    crop = check_model_kind(bundle.meta, bundle.source or bundle.path, objects=True)
    file = str(image) if isinstance(image, (str, Path)) else None
    infos: deque = deque()  # filled by the reading thread, in the order the crops are yielded
    pages_seen: set[int] = set()

    def crops():
        for info, arr in object_crops(image, labels, crop, page_axis=page_axis):
            pages_seen.add(info.page)
            infos.append(info)
            yield file, info.page, arr

    for pred in predictor.predict_pages(crops(), should_stop, tta=tta):
        info = infos.popleft()
        yield ObjectPrediction(
            **{name: getattr(pred, name) for name in _PAGE_FIELDS},
            object_label=info.label,
            centroid=(float(info.centroid[0]), float(info.centroid[1])),
            area=info.area,
            bbox=info.bbox,
            touches_border=info.touches_border,
        )
    if empty_pages is not None:
        n = _n_pages(image, page_axis)
        empty_pages.extend(p for p in range(n) if p not in pages_seen)


def _n_pages(image, page_axis) -> int:
    if isinstance(image, (str, Path)):
        return count_pages(image)
    stack = array_pages(np.asarray(image), page_axis)
    return 1 if stack is None else len(stack)
