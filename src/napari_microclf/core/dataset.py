"""The class-folder dataset: ``root/<class>/<image>``, its examples, and its persisted split.

- Folders whose name starts with ``.`` or ``_`` are not classes (``.trash``, the feature
  cache, ...). Every other sub-folder is a class, even while it is empty.
- :func:`add_example` writes a TIFF atomically and never overwrites: the file name carries a
  hash of the pixels, so the same image is recognised and reported instead of written twice.
- The train/val/test split is stratified, seeded and stored in ``root/split.json``. Later
  trainings and evaluations reuse it; new files are assigned to the subsets without moving
  any file already assigned, so a test image never drifts into training.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import ImageReadError, PageRef, count_pages, is_image_file

SPLIT_FILE = "split.json"
TRASH_DIR = ".trash"
SUBSETS = ("train", "val", "test")
_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


class DatasetError(ValueError):
    """A dataset problem, said so that the user knows what to do."""


# -- classes ----------------------------------------------------------------------------


def check_class_name(name: str) -> str:
    """Return ``name`` stripped if it is usable as a class folder name, else raise."""
    name = (name or "").strip()
    if not name:
        raise DatasetError("a class name cannot be empty")
    if name in (".", "..") or name[0] in "._":
        raise DatasetError(f"class name {name!r} cannot start with '.' or '_' (reserved)")
    if _BAD_NAME.search(name):
        raise DatasetError(
            f"class name {name!r} contains a character not allowed in folder names "
            '(< > : " / \\ | ? * or control characters)'
        )
    if name != name.rstrip(". ") or len(name) > 100:
        raise DatasetError(f"class name {name!r} cannot end with '.' or space or exceed 100 chars")
    return name


def list_classes(root: str | Path) -> list[str]:
    """Class folder names, sorted (this order is the model's class order)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


def class_files(root: str | Path, class_name: str) -> list[Path]:
    folder = Path(root) / class_name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def class_counts(root: str | Path) -> dict[str, int]:
    """Number of image files per class (empty classes included)."""
    return {c: len(class_files(root, c)) for c in list_classes(root)}


def add_class(root: str | Path, name: str) -> Path:
    name = check_class_name(name)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def rename_class(root: str | Path, old: str, new: str) -> Path:
    new = check_class_name(new)
    src, dst = Path(root) / old, Path(root) / new
    if not src.is_dir():
        raise DatasetError(f"class {old!r} does not exist in {root}")
    if dst.exists():
        raise DatasetError(f"class {new!r} already exists in {root}; choose another name")
    src.rename(dst)
    _rename_in_split(Path(root), old, new)
    return dst


def remove_class(root: str | Path, name: str) -> Path:
    """Move a class folder (with its images) into the dataset's trash; nothing is deleted."""
    src = Path(root) / name
    if not src.is_dir():
        raise DatasetError(f"class {name!r} does not exist in {root}")
    dst = _unique(Path(root) / TRASH_DIR / name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    return dst


def move_to_trash(root: str | Path, path: str | Path) -> Path:
    """Move one example into ``root/.trash/<class>/`` (the Annotate widget's Undo)."""
    root, path = Path(root), Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file to move to the trash")
    dst = _unique(root / TRASH_DIR / path.parent.name / path.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dst))
    return dst


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(1, 100000):
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not cand.exists():
            return cand
    raise DatasetError(f"cannot find a free name next to {path}")


# -- adding examples --------------------------------------------------------------------


@dataclass(frozen=True)
class AddResult:
    path: Path
    written: bool  # False: the same pixels were already in the dataset
    class_name: str  # the class holding ``path``

    @property
    def duplicate(self) -> bool:
        return not self.written


def pixel_hash(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    h = hashlib.sha1()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:12]


def _stem_for(source, page) -> str:
    stem = Path(str(source)).stem if source else "image"
    stem = stem.removesuffix(".ome")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:60] or "image"
    return f"{stem}_p{int(page):04d}" if page is not None else stem


def find_by_hash(root: str | Path, digest: str) -> Path | None:
    for c in list_classes(root):
        for p in (Path(root) / c).glob(f"*_{digest}.tif"):
            return p
    return None


def add_example(
    root: str | Path,
    class_name: str,
    array: np.ndarray,
    source: str | Path | None = None,
    page: int | None = None,
) -> AddResult:
    """Write ``array`` (``(Y, X)`` or ``(Y, X, C)``) as a TIFF into ``root/class_name``.

    The file is written to a temporary name and linked into place, so a crash never leaves
    half a file and an existing file is never overwritten. Provenance (source file, page,
    date) is stored in the TIFF description. If the same pixels are already anywhere in the
    dataset the existing file is returned with ``written=False``.
    """
    import tifffile

    class_name = check_class_name(class_name)
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] <= 4)) or min(arr.shape[:2]) < 2:
        raise DatasetError(
            f"an example must be a 2D image (Y, X) or (Y, X, C) with up to 4 channels; got "
            f"shape {arr.shape}. For a stack, add its pages one by one."
        )
    digest = pixel_hash(arr)
    existing = find_by_hash(root, digest)
    if existing is not None:
        return AddResult(existing, False, existing.parent.name)

    folder = add_class(root, class_name)
    final = folder / f"{_stem_for(source, page)}_{digest}.tif"
    provenance = {
        "source": str(source) if source is not None else None,
        "page": int(page) if page is not None else None,
        "added": _dt.datetime.now().isoformat(timespec="seconds"),
        "class": class_name,
    }
    data, axes = (arr, "YX") if arr.ndim == 2 else (np.moveaxis(arr, -1, 0), "CYX")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tif", dir=folder)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, photometric="minisblack",
                         metadata={"axes": axes, "microclf": provenance})
        try:
            os.link(tmp, final)  # fails if ``final`` exists: never overwrites
        except FileExistsError:
            return AddResult(final, False, class_name)
        except OSError:  # file systems without hard links
            if final.exists():
                return AddResult(final, False, class_name)
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return AddResult(final, True, class_name)


def read_provenance(path: str | Path) -> dict:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        meta = tif.shaped_metadata
        return dict(meta[0].get("microclf", {})) if meta else {}


# -- the split ----------------------------------------------------------------------------


@dataclass
class Split:
    """``assignments`` maps ``"<class>/<file>"`` to ``"train"``, ``"val"`` or ``"test"``."""

    val_fraction: float = 0.2
    test_fraction: float = 0.1
    seed: int = 0
    assignments: dict[str, str] = field(default_factory=dict)

    def files(self, subset: str) -> list[str]:
        return sorted(k for k, v in self.assignments.items() if v == subset)

    def counts(self) -> dict[str, int]:
        return {s: sum(v == s for v in self.assignments.values()) for s in SUBSETS}

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "assignments": dict(sorted(self.assignments.items())),
        }


def load_split(root: str | Path) -> Split | None:
    path = Path(root) / SPLIT_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return Split(float(d["val_fraction"]), float(d["test_fraction"]), int(d["seed"]),
                     {str(k): str(v) for k, v in d["assignments"].items()})
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path} is corrupt ({exc}); delete it to let microclf make a new split "
            "(the test set will then be drawn again)"
        ) from exc


def _save_split(root: Path, split: Split) -> None:
    atomic_write_text(root / SPLIT_FILE, json.dumps(split.to_dict(), indent=1))


def _rename_in_split(root: Path, old: str, new: str) -> None:
    split = load_split(root)
    if split is None:
        return
    split.assignments = {
        (f"{new}/{k.split('/', 1)[1]}" if k.split("/", 1)[0] == old else k): v
        for k, v in split.assignments.items()
    }
    _save_split(root, split)


def _order_key(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def update_split(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    resplit: bool = False,
) -> tuple[Split, list[str]]:
    """Load ``split.json``, assign new files, drop vanished ones, save; return (split, notes).

    An existing split keeps its fractions and seed (a note says so when the arguments
    differ); ``resplit=True`` draws a new one.
    """
    root = Path(root)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError("validation and test fractions must be in [0, 1) and sum below 1")
    notes: list[str] = []
    split = None if resplit else load_split(root)
    if split is None:
        split = Split(val_fraction, test_fraction, seed)
    elif (split.val_fraction, split.test_fraction, split.seed) != (val_fraction, test_fraction,
                                                                    seed):
        notes.append(
            f"Reusing the split stored in {root / SPLIT_FILE} (val {split.val_fraction:.0%}, "
            f"test {split.test_fraction:.0%}, seed {split.seed}) so the test set stays unseen; "
            "use a new split (--resplit) to change it."
        )
    current = {f"{c}/{p.name}" for c in list_classes(root) for p in class_files(root, c)}
    before = dict(split.assignments)
    split.assignments = {k: v for k, v in split.assignments.items() if k in current}
    fractions = {"train": 1 - split.val_fraction - split.test_fraction,
                 "val": split.val_fraction, "test": split.test_fraction}
    for c in list_classes(root):
        keys = [k for k in current if k.split("/", 1)[0] == c]
        counts = {s: 0 for s in SUBSETS}
        for k in keys:
            if k in split.assignments:
                counts[split.assignments[k]] += 1
        new = sorted((k for k in keys if k not in split.assignments),
                     key=lambda k: _order_key(split.seed, k))
        for k in new:
            n = sum(counts.values()) + 1
            # the subset furthest below its share of n takes the file; ties favour train
            subset = max(SUBSETS, key=lambda s: (n * fractions[s] - counts[s], s == "train"))
            split.assignments[k] = subset
            counts[subset] += 1
    if split.assignments != before or not (root / SPLIT_FILE).exists():
        _save_split(root, split)
    return split, notes


# -- samples for training ---------------------------------------------------------------


@dataclass
class DatasetSamples:
    class_names: list[str]
    train: list[PageRef]
    val: list[PageRef]
    test: list[PageRef]
    split: Split
    notes: list[str]

    def distribution(self, subset: str = "train") -> dict[int, int]:
        refs = getattr(self, subset)
        return {i: sum(r.label == i for r in refs) for i in range(len(self.class_names))}


def check_dataset(root: str | Path) -> list[str]:
    """Classes of a dataset fit for training, or a DatasetError saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; create class folders "
                           "(dataset/<class>/<images>) or use the Annotate widget")
    counts = class_counts(root)
    if len(counts) < 2:
        raise DatasetError(
            f"{root} has {len(counts)} class folder(s) {list(counts)}; a classifier needs at "
            "least 2 classes, each a sub-folder with images"
        )
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DatasetError(
            f"class folder(s) {empty} in {root} have no images; add images or remove the folder"
        )
    return list(counts)


def load_samples(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    resplit: bool = False,
) -> DatasetSamples:
    """Check the dataset, update its split, and expand files into labelled pages."""
    root = Path(root)
    classes = check_dataset(root)
    split, notes = update_split(root, val_fraction, test_fraction, seed, resplit)
    subsets: dict[str, list[PageRef]] = {s: [] for s in SUBSETS}
    for key, subset in sorted(split.assignments.items()):
        cls, name = key.split("/", 1)
        path = root / cls / name
        try:
            n = count_pages(path)
        except ImageReadError as exc:
            raise DatasetError(f"{exc} (in class {cls!r}; fix or remove this file)") from exc
        for i in range(n):
            subsets[subset].append(PageRef(path, i, classes.index(cls), {"key": key}))
    if not subsets["train"]:
        raise DatasetError(f"{root}: no training images after the split; add more images")
    missing = [c for i, c in enumerate(classes) if not any(r.label == i for r in subsets["train"])]
    if missing:
        raise DatasetError(f"class(es) {missing} have no training image; add more images")
    if not subsets["val"] and split.val_fraction > 0:
        raise DatasetError(
            f"{root}: too few images for a validation set ({sum(map(len, subsets.values()))} "
            "in all); add images (about 10 per class at least)"
        )
    return DatasetSamples(classes, subsets["train"], subsets["val"], subsets["test"], split,
                          notes)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
