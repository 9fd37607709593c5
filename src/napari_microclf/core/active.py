"""Label next: which unlabelled pages would teach the model most, and a retrain that says
what the new labels changed.

:func:`uncertainty` scores each page from its class probabilities (``margin``: one minus the
gap between the two most likely classes; ``entropy``: the normalised entropy), 1 meaning the
model cannot tell the classes apart. :func:`rank` orders pages by it, the pages unlike the
training images (``unfamiliar``) first or last. :func:`label_next` runs a model over folders
or files and returns the top pages not yet in the dataset. :func:`retrain` trains the model
folder again with its own settings (so a frozen base reuses the feature cache and takes
seconds) and scores the old and the new model on the same test list: the old model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import PREVIOUS_DIR, read_meta
from .dataset import DatasetError, hash_index, pixel_hash
from .evaluate import evaluate
from .images import find_images, read_page
from .objects import object_crops
from .predict_objects import check_model_kind, classify_objects, label_pairs
from .predictor import Predictor
from .train import train
from .train_config import TrainConfig

METHODS = ("margin", "entropy")
UNFAMILIAR_ORDER = ("first", "last")


def uncertainty(probs, method: str = "margin") -> np.ndarray:
    """Per-row uncertainty in [0, 1] of class probabilities ``(N, K)``: 1 is a coin toss."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (pages, classes >= 2), got shape {p.shape}")
    if method == "margin":
        top = np.sort(p, axis=1)[:, -2:]
        return 1.0 - (top[:, 1] - top[:, 0])
    q = np.clip(p, 1e-12, 1.0)
    return -(q * np.log(q)).sum(axis=1) / np.log(p.shape[1])


def rank(
    probs,
    unfamiliar=None,
    method: str = "margin",
    unfamiliar_order: str = "first",
    keys: Sequence | None = None,
) -> list[int]:
    """Indices of the pages, most worth labelling first.

    ``unfamiliar`` (booleans per page, optional) puts the pages unlike the training images
    ``first`` (they may be a class the model lacks) or ``last`` (they may be debris);
    within each part, the most uncertain first; ties in input order (or by ``keys``).
    """
    if unfamiliar_order not in UNFAMILIAR_ORDER:
        raise ValueError(
            f"unfamiliar_order must be one of {UNFAMILIAR_ORDER}, got {unfamiliar_order!r}"
        )
    u = uncertainty(probs, method)
    flag = np.zeros(len(u), bool) if unfamiliar is None else np.asarray(unfamiliar, bool)
    part = np.where(flag, 0, 1) if unfamiliar_order == "first" else np.where(flag, 1, 0)
    tie = list(range(len(u))) if keys is None else list(keys)
    return sorted(range(len(u)), key=lambda i: (part[i], -u[i], tie[i]))


@dataclass(frozen=True)
class Candidate:
    """A page worth labelling: where it is, the model's guess and why it was picked."""

    file: str
    page: int
    guess: str
    confidence: float
    uncertainty: float
    unfamiliar: bool
    probabilities: dict
    label: int | None = None  # an object's label id (a model of objects), else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ranked(
    preds: Sequence,
    class_names: Sequence[str],
    method: str = "margin",
    unfamiliar_order: str = "first",
    keys: Sequence | None = None,
) -> Iterator[Candidate]:
    """``PagePrediction``s as :class:`Candidate`s, most worth labelling first (see
    :func:`rank`), made as they are taken."""
    if not preds:
        return
    probs = np.array([[p.probabilities[c] for c in class_names] for p in preds])
    u = uncertainty(probs, method)
    for i in rank(probs, [p.unfamiliar for p in preds], method, unfamiliar_order, keys):
        p = preds[i]
        yield Candidate(
            str(p.file),
            int(p.page),
            p.class_name,
            float(p.confidence),
            float(u[i]),
            bool(p.unfamiliar),
            dict(p.probabilities),
            getattr(p, "object_label", None),
        )


def label_next(
    bundle,
    inputs,
    n: int = 20,
    method: str = "margin",
    unfamiliar_order: str = "first",
    dataset: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    labels: str | Path | None = None,
    labels_suffix: str | None = None,
) -> list[Candidate]:
    """The ``n`` pages of ``inputs`` (folders, files) most worth labelling next; for a model
    of objects, the ``n`` objects (each image with its ``labels``, or with the label file
    named after it plus ``labels_suffix``: see :func:`~.predict_objects.label_pairs`).

    Files inside ``dataset`` are skipped, and so are pages (objects) whose pixels are already
    an example of it (added before from this very file). Unreadable files are skipped (they
    are listed by ``microclf predict``).
    """
    predictor = bundle if isinstance(bundle, Predictor) else Predictor(bundle)
    meta = predictor.bundle.meta
    crop = check_model_kind(
        meta, predictor.bundle.source or predictor.bundle.path, bool(labels or labels_suffix)
    )
    root = Path(dataset).resolve() if dataset is not None else None

    def outside(path) -> bool:
        return root is None or root not in Path(path).resolve().parents

    label_files: dict[str, Path] = {}
    if crop is None:
        paths = [p for p in find_images(inputs) if outside(p)]
        preds = [
            p
            for batch in predictor.classify_paths(paths, should_stop=should_stop)
            for p in batch
            if hasattr(p, "probabilities")
        ]
    else:
        pairs = [pair for pair in label_pairs(inputs, labels, labels_suffix) if outside(pair[0])]
        preds = classify_objects(predictor, pairs, should_stop=should_stop).predictions
        label_files = {str(image): lab for image, lab in pairs}
    known = hash_index(root) if root is not None and root.is_dir() else {}
    out = []
    for c in ranked(
        preds,
        predictor.class_names,
        method,
        unfamiliar_order,
        keys=[(p.file, p.page, getattr(p, "object_label", 0)) for p in preds],
    ):
        if known and pixel_hash(_pixels(c, crop, label_files)) in known:
            continue
        out.append(c)
        if len(out) >= n:
            break
    return out


def _pixels(c: Candidate, crop, label_files: dict) -> np.ndarray:
    """The pixels an example of candidate ``c`` holds: its page (``dataset.add_example``),
    or for an object the crop ``objects.add_objects`` cuts with the model's ``crop``."""
    if crop is None:
        return _example_pixels(read_page(c.file, c.page))
    pages = [c.page]
    ((_, pixels),) = object_crops(c.file, label_files[c.file], crop, pages=pages, ids=[c.label])
    return _example_pixels(pixels)


def _example_pixels(page: np.ndarray) -> np.ndarray:
    """The pixels ``dataset.add_example`` would store for ``page`` (what its hash is of)."""
    arr = np.asarray(page)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr


def is_labelled(candidate: Candidate | dict, index: dict) -> str | None:
    """The class a candidate page was added to (``index`` from ``dataset.hash_index``)."""
    c = candidate if isinstance(candidate, dict) else candidate.to_dict()
    path = index.get(pixel_hash(_example_pixels(read_page(c["file"], int(c["page"])))))
    return path.parent.name if path is not None else None


# -- retrain and compare --------------------------------------------------------------------


@dataclass(frozen=True)
class Retrained:
    """What a retrain changed, on the old model's test list."""

    bundle: Path
    before: float | None  # the old model's accuracy on its test list, scored now
    after: float | None  # the new model's accuracy on that same list
    n: int  # pages scored
    train_result: object

    def summary(self) -> str:
        if self.before is None or self.after is None:
            return "Retrained; no common test list to compare on."
        return (
            f"Test accuracy on the same {self.n} test pages: {self.before:.1%} before, "
            f"{self.after:.1%} after ({self.after - self.before:+.1%})."
        )


def config_of(model_dir: str | Path, **changes):
    """The ``TrainConfig`` the model folder was trained with (``changes`` applied)."""
    stored = read_meta(model_dir).get("config") or {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in fields}
    values.update(out_dir=str(model_dir), **changes)
    return TrainConfig(**values)


def retrain(model_dir: str | Path, on_update=None, should_stop=None, **changes) -> Retrained:
    """Train ``model_dir`` again with its own settings and the dataset as it is now, then
    score the old model (now in ``previous/``) and the new one on the old model's test list.

    A stopped or failed training changes nothing (the old model stays the model).
    """
    model_dir = Path(model_dir)
    result = train(config_of(model_dir, **changes), on_update=on_update, should_stop=should_stop)
    if getattr(result, "bundle", None) is None:
        return Retrained(model_dir, None, None, 0, result)
    previous = model_dir / PREVIOUS_DIR
    try:
        old = evaluate(previous, save=False)
        new = evaluate(model_dir, lists_from=previous, save=False)
    except DatasetError:  # the old model's test list is empty (or gone): nothing to compare
        return Retrained(model_dir, None, None, 0, result)
    return Retrained(model_dir, old["accuracy"], new["accuracy"], int(new["n"]), result)
