"""Objects: the crop around each label of a segmentation, an example or a page of its own.

An object is one label of a label image (a napari Labels layer, or the mask file cellpose or
StarDist wrote) in its image: 2D, or each page of a stack. :class:`CropSpec` says how its crop
is cut: a square window centred on the object's bounding box, its side the box's longer side
plus a margin on each side (``size="object"``) or a fixed number of pixels
(``size="fixed"``), zero-padded where it leaves the image; optionally the other objects
(``mask="others"``) or everything but the object (``mask="object"``) set to zero. A dataset
of objects records its crop settings in ``objects.json`` (one setting per dataset), a model
trained on it keeps them in its bundle, and prediction cuts exactly the same crops.

Crops go into the class folders like any example (:func:`add_objects`), with their
provenance (source image, page, label file, label id, bounding box), so the grouped split
keeps the objects of one field of view in one subset, and training, the report, review,
label-next and export work on them unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .dataset import AddResult, add_example, hash_index
from .errors import DatasetError, ImageReadError
from .files import atomic_write_text
from .images import array_pages, open_image

OBJECTS_FILE = "objects.json"  # a dataset of objects: its crop settings
SIZES = ("object", "fixed")
MASKS = ("none", "others", "object")
MIN_SIDE = 8  # the smallest page a model takes (images.shape_problem)


@dataclass(frozen=True)
class CropSpec:
    """How an object's crop is cut (recorded in the dataset and in the model).

    - ``size``: ``"object"``, the bounding box's longer side times ``1 + 2 * margin``; or
      ``"fixed"``, ``context`` pixels whatever the object's size (a larger object is cut off).
    - ``margin``: with ``size="object"``, the context on each side as a fraction of the box's
      longer side (0.25: the object fills two thirds of the crop).
    - ``context``: with ``size="fixed"``, the crop's side in pixels.
    - ``mask``: ``"none"`` keeps the neighbourhood as it is; ``"others"`` sets the other
      objects' pixels to zero; ``"object"`` sets everything but the object to zero.
    """

    size: str = "object"
    margin: float = 0.25
    context: int = 64
    mask: str = "none"

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"crop size must be one of {SIZES}, got {self.size!r}")
        if self.mask not in MASKS:
            raise ValueError(f"crop mask must be one of {MASKS}, got {self.mask!r}")
        if not (isinstance(self.margin, (int, float)) and 0 <= self.margin <= 5):
            raise ValueError(
                f"crop margin must be 0 to 5 (a fraction of the object), got {self.margin!r}"
            )
        if not (isinstance(self.context, int) and MIN_SIDE <= self.context <= 4096):
            raise ValueError(
                f"crop context must be {MIN_SIDE} to 4096 pixels, got {self.context!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CropSpec:
        if not isinstance(d, dict):
            raise ValueError(f"crop settings must be a JSON object, got {type(d).__name__}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        side = (
            f"the object's box plus {self.margin:g} of its side on each side"
            if self.size == "object"
            else f"{self.context} px around the object's centre"
        )
        masked = {"none": "", "others": ", other objects masked", "object": ", only the object"}
        return side + masked[self.mask]


@dataclass(frozen=True)
class ObjectInfo:
    """One label on one page: its bounding box ``(y0, x0, y1, x1)`` (end exclusive), centroid,
    area in pixels, and whether it touches the page's border."""

    label: int
    page: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    touches_border: bool


def check_labels(labels: np.ndarray, shape: Sequence[int], where: str = "labels") -> np.ndarray:
    """``labels`` as an integer ``(Y, X)`` array matching an image page of ``shape`` (Y, X
    first), or an ImageReadError that says what is wrong and what to do."""
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ImageReadError(
            f"{where} has {labels.dtype} values, not integer labels: each object needs its "
            "own whole number (0 is background); label a mask first (skimage.measure.label)"
        )
    if labels.ndim != 2 or tuple(labels.shape) != tuple(shape[:2]):
        raise ImageReadError(
            f"{where} is {tuple(labels.shape)} but the image page is {tuple(shape[:2])} "
            "(Y, X): the labels must be the segmentation of this very image"
        )
    if labels.size and labels.min() < 0:
        raise ImageReadError(
            f"{where} has negative labels; objects are 1, 2, ... (0 is background)"
        )
    return labels


def objects_of(labels: np.ndarray, page: int = 0) -> list[ObjectInfo]:
    """The objects of a ``(Y, X)`` integer label page, by label. Ids need not be contiguous;
    one pass over the pixels (bincount) for areas and centroids."""
    from scipy import ndimage

    labels = np.asarray(labels)
    flat = labels.ravel()
    if not flat.size or not flat.any():
        return []
    n = int(flat.max()) + 1
    area = np.bincount(flat, minlength=n)
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    sy = np.bincount(flat, weights=yy.ravel(), minlength=n)
    sx = np.bincount(flat, weights=xx.ravel(), minlength=n)
    h, w = labels.shape
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        out.append(
            ObjectInfo(
                label=i,
                page=page,
                bbox=(y0, x0, y1, x1),
                centroid=(sy[i] / area[i], sx[i] / area[i]),
                area=int(area[i]),
                touches_border=y0 == 0 or x0 == 0 or y1 == h or x1 == w,
            )
        )
    return out


def crop_window(info: ObjectInfo, spec: CropSpec) -> tuple[int, int, int]:
    """``(top, left, side)`` of the object's square crop in page coordinates (it may reach
    beyond the page: :func:`cut_crop` pads)."""
    y0, x0, y1, x1 = info.bbox
    if spec.size == "fixed":
        side = spec.context
    else:
        side = math.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * spec.margin))
    side = max(side, MIN_SIDE)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    return int(math.floor(cy - side / 2)), int(math.floor(cx - side / 2)), side


def cut_crop(page: np.ndarray, labels: np.ndarray, info: ObjectInfo, spec: CropSpec) -> np.ndarray:
    """The object's crop of ``page`` (``(Y, X)`` or ``(Y, X, C)``, its dtype kept), zero
    where the window leaves the page and where ``spec.mask`` masks."""
    top, left, side = crop_window(info, spec)
    h, w = page.shape[:2]
    out = np.zeros((side, side, *page.shape[2:]), page.dtype)
    ys, xs = max(top, 0), max(left, 0)
    ye, xe = min(top + side, h), min(left + side, w)
    if ye > ys and xe > xs:
        region = (slice(ys - top, ye - top), slice(xs - left, xe - left))
        out[region] = page[ys:ye, xs:xe]
        if spec.mask != "none":
            lab = labels[ys:ye, xs:xe]
            hide = (
                (lab != info.label) if spec.mask == "object" else (lab != 0) & (lab != info.label)
            )
            out[region][hide] = 0
    return out


# -- reading an image with its labels --------------------------------------------------------


class _Pages:
    """The pages of an image given as a path (read one at a time) or an array (``page_axis``
    for a stack): ``len()``, ``[i]``, and ``close()``."""

    def __init__(self, source, page_axis: int | None = None, labels: bool = False):
        self.file = None
        if isinstance(source, (str, Path)):
            self.file = open_image(source)
            self.n, self._get = len(self.file), self.file.page
            return
        arr = np.asarray(source)
        if labels:  # (Y, X) for one page or every page, else (pages, Y, X)
            stack = arr[None] if arr.ndim == 2 else arr
        else:
            stack = array_pages(arr, page_axis)
            stack = arr[None] if stack is None else stack
        self.n, self._get = len(stack), stack.__getitem__

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self._get(i)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def image_objects(
    image,
    labels,
    *,
    page_axis: int | None = None,
    pages: Iterable[int] | None = None,
    ids: Iterable[int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[ObjectInfo]]]:
    """``(page, image page, label page, objects)`` for each page of ``image`` (a path or an
    array; ``page_axis`` for an array stack) with ``labels`` (a path or an array: one label
    page for a 2D image, one per page of a stack, or one 2D label image for every page).
    ``pages`` and ``ids`` choose pages and labels. Pages are read one at a time."""
    where = str(labels) if isinstance(labels, (str, Path)) else "the labels"
    wanted = None if ids is None else {int(i) for i in ids}
    chosen = None if pages is None else {int(p) for p in pages}
    img = _Pages(image, page_axis)
    try:
        lab = _Pages(labels, labels=True)
    except BaseException:
        img.close()
        raise
    try:
        if len(lab) not in (1, len(img)):
            raise ImageReadError(
                f"{where} has {len(lab)} pages but the image has {len(img)}: give one label "
                "page per image page, or one for all"
            )
        for i in range(len(img)):
            if chosen is not None and i not in chosen:
                continue
            page = img[i]
            lab_page = check_labels(lab[i if len(lab) > 1 else 0], page.shape, where)
            objs = objects_of(lab_page, i)
            if wanted is not None:
                objs = [o for o in objs if o.label in wanted]
            yield i, page, lab_page, objs
    finally:
        img.close()
        lab.close()


def object_crops(
    image, labels, spec: CropSpec, **kwargs
) -> Iterator[tuple[ObjectInfo, np.ndarray]]:
    """Each object's :class:`ObjectInfo` and crop, page by page (see :func:`image_objects`)."""
    for _page, img, lab, objs in image_objects(image, labels, **kwargs):
        for info in objs:
            yield info, cut_crop(img, lab, info, spec)


def model_crop_spec(meta: dict) -> CropSpec | None:
    """The crop settings a model was trained with (``microclf.json``'s ``objects``), None for
    a model of whole images."""
    info = meta.get("objects")
    return None if info is None else CropSpec.from_dict(info.get("crop", {}))


# -- a dataset of objects ------------------------------------------------------------------


def dataset_crop_spec(root: str | Path) -> CropSpec | None:
    """The crop settings of a dataset of objects (its ``objects.json``), None for a dataset
    of whole images."""
    path = Path(root) / OBJECTS_FILE
    if not path.is_file():
        return None
    try:
        return CropSpec.from_dict(json.loads(path.read_text())["crop"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path} is unreadable or invalid ({exc}); restore it, or remove it if the "
            "dataset holds no object crops"
        ) from exc


def _use_crop_spec(root: Path, spec: CropSpec, have: CropSpec | None) -> None:
    """Record ``spec`` as the dataset's (``have``: the recorded one, None: none yet), or
    refuse one that differs from the recorded."""
    if have is None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / OBJECTS_FILE, json.dumps({"crop": spec.to_dict()}, indent=1))
    elif have != spec:
        raise DatasetError(
            f"the objects of {root} are cut as {have.describe()}, not {spec.describe()}: one "
            "dataset has one crop setting (the model cuts its crops so); use that one or "
            "another dataset"
        )


def add_objects(
    root: str | Path,
    image: str | Path,
    labels: str | Path,
    assign: str | dict,
    spec: CropSpec | None = None,
    *,
    ids: Iterable[int] | None = None,
    source: str | Path | None = None,
    page_axis: int | None = None,
    page: int | None = None,
    labels_source: str | None = None,
    index: dict[str, Path] | None = None,
) -> list[AddResult]:
    """Put objects of ``image`` (a path, or an array with ``source``) segmented by ``labels``
    into dataset ``root``'s class folders. ``assign``: one class name for every object (or
    those in ``ids``), or a dict ``{(page, label): class}`` (a table). Returns one AddResult
    per object (``written`` False where the same crop was there already). ``spec``: the
    dataset's crop settings (recorded in ``objects.json`` by the first call; a different one
    is refused). ``source``: the image's file (default: ``image`` itself when it is a path),
    recorded with each crop: the split keeps the objects of one source in one subset, so an
    array needs it.

    ``page``: ``image`` and ``labels`` are that one page of a stack (recorded so);
    ``labels_source``: the labels' name recorded for an array (default: the path).
    ``index``: as :func:`~.dataset.add_example`'s (from :func:`~.dataset.hash_index`; made
    here when None), for a caller adding objects in several calls."""
    if source is None and not isinstance(image, (str, Path)):
        raise ValueError(
            "add_objects of an array needs source=, the image's file or name: the split keeps "
            "the objects of one field of view together by it"
        )
    source = image if source is None else source
    root = Path(root)
    have = dataset_crop_spec(root)
    spec = spec or have or CropSpec()
    _use_crop_spec(root, spec, have)
    table = assign if isinstance(assign, dict) else None
    if table is not None:
        ids = {label for _page, label in table}
    index = hash_index(root) if index is None else index
    out = []
    if labels_source is None:  # an array's name, if any, is the caller's to give
        labels_source = str(labels) if isinstance(labels, (str, Path)) else None
    for info, crop in object_crops(image, labels, spec, ids=ids, page_axis=page_axis):
        at = info.page if page is None else page
        cls = assign if table is None else table.get((at, info.label))
        if cls is None:
            continue
        out.append(
            add_example(
                root,
                cls,
                crop,
                source=source,
                page=at,
                index=index,
                extra={"labels": labels_source, "label": info.label, "bbox": list(info.bbox)},
            )
        )
    return out
