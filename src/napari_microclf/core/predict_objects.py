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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import BundleError, DatasetError, ImageReadError, one_line
from .images import find_images, is_image_file
from .objects import CropSpec, cut_crop, image_objects, model_crop_spec
from .predictor import Predictor
from .results import FileError, ObjectPrediction, PagePrediction


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
# What an image or its labels may raise that makes that image a FileError, the others going
# on (an unreadable file, labels that do not fit); anything else stops the run.
IMAGE_ERRORS = (ImageReadError, DatasetError)


def predict_objects(
    predictor: Predictor | str | Path,
    image,
    labels,
    *,
    page_axis: int | None = None,
    pages: Iterable[int] | None = None,
    tta: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
    empty_pages: list[int] | None = None,
) -> Iterator[ObjectPrediction]:
    """Classify every object of ``image`` (a path or an array; ``page_axis`` for an array
    stack) segmented by ``labels`` (a path or an integer array: one label page per image
    page, or one for all), in page and label order; ``pages``: only these pages.

    ``empty_pages``: a list that receives the pages without any object (they give no rows).
    ``tta`` and ``should_stop``: see :meth:`~.predictor.Predictor.predict_pages`.
    """
    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor)
    bundle = predictor.bundle
    crop = check_model_kind(bundle.meta, bundle.source or bundle.path, objects=True)
    file = str(image) if isinstance(image, (str, Path)) else None
    infos: deque = deque()  # filled by the reading thread, in the order the crops are yielded

    def crops():
        for page, img, lab, objs in image_objects(image, labels, page_axis=page_axis, pages=pages):
            if not objs and empty_pages is not None:
                empty_pages.append(page)
            for info in objs:
                infos.append(info)
                yield file, page, cut_crop(img, lab, info, crop)

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


def label_pairs(
    paths, labels: str | Path | None = None, suffix: str | None = None
) -> list[tuple[Path, Path]]:
    """``(image, labels)`` pairs: one image with ``labels``, or every image under ``paths``
    with the file of the same name plus ``suffix`` beside it (``x.tif`` with
    ``x_labels.tif`` for ``suffix="_labels"``; the label files themselves are not images to
    classify). An ImageReadError names an image without its labels."""
    files = find_images(paths)
    if labels is not None:
        if len(files) != 1:
            raise ImageReadError(
                f"--labels pairs one image with one label file, but {len(files)} images were "
                "given; for many, name the label files after their images and give "
                "--labels-suffix (x.tif with x_labels.tif: --labels-suffix _labels)"
            )
        return [(files[0], Path(labels))]
    if not suffix:
        raise ImageReadError("objects need their labels: give --labels or --labels-suffix")
    stems = {(f.parent, f.stem) for f in files}
    images = [  # a file is a label file when its image (its name less the suffix) is here
        f
        for f in files
        if not (f.stem.endswith(suffix) and (f.parent, f.stem[: -len(suffix)]) in stems)
    ]
    pairs, missing = [], []
    for f in images:
        found = [p for p in f.parent.glob(f"{f.stem}{suffix}.*") if is_image_file(p)]
        (pairs.append((f, sorted(found)[0])) if found else missing.append(f.name))
    if missing:
        raise ImageReadError(
            f"{len(missing)} image(s) have no label file named <image>{suffix}.<ext> beside "
            f"them: {', '.join(missing[:5])}" + (", ..." if len(missing) > 5 else "")
        )
    return pairs


@dataclass
class ObjectsResult:
    """What :func:`classify_objects` did: the objects (in image, page and label order), the
    images it could not classify, and the pages without objects."""

    predictions: list[ObjectPrediction] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    empty_pages: list[tuple[str, int]] = field(default_factory=list)
    n_images: int = 0
    stopped: bool = False

    def summary(self) -> str:
        n = len(self.predictions)
        pages = len({(p.file, p.page) for p in self.predictions})
        images = len({p.file for p in self.predictions})
        text = (
            f"Classified {n} object(s) on {pages} page(s) of {images} of {self.n_images} image(s)"
        )
        if border := sum(p.touches_border for p in self.predictions):
            text += f"; {border} touch the image's border (their crops are padded with zeros)"
        if self.empty_pages:
            shown = ", ".join(f"{Path(f).name} page {p}" for f, p in self.empty_pages[:3])
            more = ", ..." if len(self.empty_pages) > 3 else ""
            text += f"; {len(self.empty_pages)} page(s) have no objects ({shown}{more})"
        if self.errors:
            text += f"; {len(self.errors)} image(s) could not be classified: " + "; ".join(
                str(e) for e in self.errors[:3]
            )
        return text + (" before the run was stopped" if self.stopped else "")


def classify_objects(
    predictor: Predictor,
    pairs: list[tuple[Path, Path]],
    *,
    tta: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_item: Callable[[ObjectPrediction | FileError], None] | None = None,
) -> ObjectsResult:
    """Every object of every ``(image, labels)`` pair; an image whose labels do not fit (or
    that cannot be read) is a FileError and the others go on."""
    result = ObjectsResult(n_images=len(pairs))
    for image, labels in pairs:
        empty: list[int] = []
        try:
            for item in predict_objects(
                predictor, image, labels, tta=tta, should_stop=should_stop, empty_pages=empty
            ):
                result.predictions.append(item)
                if on_item is not None:
                    on_item(item)
        except IMAGE_ERRORS as exc:
            error = FileError(str(image), one_line(exc, image))
            result.errors.append(error)
            if on_item is not None:
                on_item(error)
        result.empty_pages += [(str(image), p) for p in empty]
        if should_stop is not None and should_stop():
            result.stopped = True
            break
    return result
