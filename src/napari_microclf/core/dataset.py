"""The class-folder dataset: ``root/<class>/<image>``, its examples, and its persisted split.

- Folders whose name starts with ``.`` or ``_`` are not classes (``.trash``, the feature
  cache, ...). Every other sub-folder is a class, even while it is empty.
- :func:`add_example` writes a TIFF atomically and never overwrites: the file name carries a
  hash of the pixels, so the same image is recognised and reported instead of written twice.
- The train/val/test split is grouped, stratified, seeded and stored in
  ``root/split.json``. Files of one group always share a subset, so neighbouring slices of
  the same cells never sit in both train and test. A file's group is the source file named
  in its provenance (every page and crop of one stack or image); with ``group_by`` (a
  regular expression) it is the part of the file name that the pattern matches instead, for
  datasets made outside napari. A file without provenance, or whose name does not match, is
  its own group, and files with identical bytes are always one group. Within those rules the
  split is stratified by class. Later trainings and evaluations reuse the split; new files
  of a known group join its subset, new groups are assigned without moving any file already
  assigned, and when groups must be made whole (an old per-file split, a changed
  ``group_by``) files move only towards test, so a test image never drifts into training.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .files import atomic_write_text, file_digest, mkstemp_for_user
from .images import ImageReadError, PageRef, count_pages, is_image_file
from .lock import split_lock

SPLIT_FILE = "split.json"
TRASH_DIR = ".trash"
SUBSETS = ("train", "val", "test")
_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


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
    if name.casefold() in RESERVED_CLASS_NAMES:
        raise DatasetError(_reserved_text(name))
    return name


# What a prediction's class reads when it is none of the classes (results.PagePrediction.label):
# a class of that name could not be told from the flag, so no class may be named so.
RESERVED_CLASS_NAMES = ("uncertain", "unfamiliar")


def _reserved_text(name: str) -> str:
    return (
        f"class name {name!r} is reserved: a prediction reads 'uncertain' below the confidence "
        "threshold and 'unfamiliar' for a page unlike the training images; choose another name"
    )


def _same_name(root: Path, name: str, but: str | None = None) -> str | None:
    """An existing class whose name equals ``name`` but for case (on Windows and macOS the
    two are one folder), other than ``but``."""
    folded = name.casefold()
    return next(
        (c for c in list_classes(root) if c.casefold() == folded and c not in (but, name)), None
    )


def nested_image_folders(root: str | Path) -> list[str]:
    """Sub-folders of class folders that hold images (``round/batch2``): training reads only
    a class folder's own files, so these are said (preflight warns), not silently skipped."""
    root = Path(root)
    out = []
    for c in list_classes(root):
        for sub in sorted(p for p in (root / c).iterdir() if p.is_dir()):
            if sub.name.startswith(".") or sub.is_symlink():
                continue
            if any(is_image_file(f) for f in sub.rglob("*") if f.is_file()):
                out.append(f"{c}/{sub.name}")
    return out


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
    if (Path(root) / name).is_dir():
        return Path(root) / name
    if other := _same_name(Path(root), name):
        raise DatasetError(
            f"class {other!r} already exists in {root}: {name!r} differs only in case (one "
            "folder on Windows and macOS); use that class or choose another name"
        )
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def rename_class(root: str | Path, old: str, new: str) -> Path:
    new = check_class_name(new)
    src, dst = Path(root) / old, Path(root) / new
    if not src.is_dir():
        raise DatasetError(f"class {old!r} does not exist in {root}")
    if dst.exists() and new != old:
        raise DatasetError(f"class {new!r} already exists in {root}; choose another name")
    if other := _same_name(Path(root), new, but=old):
        raise DatasetError(
            f"class {other!r} already exists in {root}: {new!r} differs only in case; "
            "choose another name"
        )
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


def hash_index(root: str | Path) -> dict[str, Path]:
    """Pixel hash -> example file for every example in the dataset, in one pass.

    For :func:`add_example`'s ``index``: adding N pages then costs N lookups, not N scans.
    """
    index: dict[str, Path] = {}
    for c in list_classes(root):
        for p in sorted((Path(root) / c).glob("*_*.tif")):
            index.setdefault(p.stem.rsplit("_", 1)[-1], p)
    return index


def add_example(
    root: str | Path,
    class_name: str,
    array: np.ndarray,
    source: str | Path | None = None,
    page: int | None = None,
    index: dict[str, Path] | None = None,
    extra: dict | None = None,
) -> AddResult:
    """Write ``array`` (``(Y, X)`` or ``(Y, X, C)``) as a TIFF into ``root/class_name``.

    The file is written to a temporary name and linked into place, so a crash never leaves
    half a file and an existing file is never overwritten. Provenance (source file, page,
    date, and ``extra``: an object's label file, label id and box) is stored in the TIFF
    description; an object's file name ends in its label id (``_l17``). If the same pixels
    are already anywhere in the dataset the existing file is returned with ``written=False``.
    ``index`` (from :func:`hash_index`, for adding many examples) is looked up instead of
    scanning the class folders, and the file written is added to it.
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
    existing = find_by_hash(root, digest) if index is None else index.get(digest)
    if existing is not None and index is not None and not existing.is_file():
        existing = find_by_hash(root, digest)  # moved or undone since the index was made
    if existing is not None:
        return AddResult(existing, False, existing.parent.name)

    folder = add_class(root, class_name)
    label = f"_l{int(extra['label'])}" if extra and "label" in extra else ""
    final = folder / f"{_stem_for(source, page)}{label}_{digest}.tif"
    provenance = {
        "source": str(source) if source is not None else None,
        "page": int(page) if page is not None else None,
        "added": _dt.datetime.now().isoformat(timespec="seconds"),
        "class": class_name,
        **(extra or {}),
    }
    data, axes = (arr, "YX") if arr.ndim == 2 else (np.moveaxis(arr, -1, 0), "CYX")
    fd, tmp = mkstemp_for_user(prefix=".tmp-", suffix=".tif", dir=folder)
    os.close(fd)
    try:
        tifffile.imwrite(
            tmp, data, photometric="minisblack", metadata={"axes": axes, "microclf": provenance}
        )
        if index is not None:
            index[digest] = final
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

SPLIT_VERSION = 2
_MAX_NOTES = 10  # detailed notes of one kind; the rest are summed up in one more note
_GROUP_PRIORITY = {"source": 0, "name": 1, "file": 2}


@dataclass
class Split:
    """The persisted train/val/test split of a dataset (``root/split.json``).

    Every map is keyed by ``"<class>/<file>"``:

    - ``assignments``: the file's subset, ``"train"``, ``"val"`` or ``"test"``;
    - ``groups``: the file's group, recorded the first time the file is seen:
      ``"source:<resolved path>"`` (the source file named in the provenance that
      :func:`add_example` writes), ``"name:<text>"`` (the part of the file name that the
      ``group_by`` pattern matched) or ``"file:<sha1>"`` (a file that is its own group);
    - ``sha1``: the sha1 of the file's bytes, recorded with its group.

    Files with identical bytes belong to one group whatever their recorded groups say;
    :meth:`group_map` gives the groups with such copies joined. ``group_by`` is the file name
    pattern the groups were taken from (None: from the source files). ``version`` is the
    schema version the split was read from; it is always written back as version 2.
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.1
    seed: int = 0
    assignments: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    group_by: str | None = None
    sha1: dict[str, str] = field(default_factory=dict)
    version: int = SPLIT_VERSION

    def files(self, subset: str) -> list[str]:
        return sorted(k for k, v in self.assignments.items() if v == subset)

    def counts(self) -> dict[str, int]:
        return {s: sum(v == s for v in self.assignments.values()) for s in SUBSETS}

    def group_map(self) -> dict[str, str]:
        """The group of each assigned file, files with identical bytes joined into one group.

        Groups that share a file content (a copy of an image under another name) are one
        group, named after one of its recorded groups (a source file first, then a file name
        match, then a single file). A file without a recorded group is its own group.
        """
        return _joined_groups(self, self.assignments)

    def to_dict(self) -> dict:
        return {
            "version": SPLIT_VERSION,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "group_by": self.group_by,
            "assignments": dict(sorted(self.assignments.items())),
            "groups": dict(sorted(self.groups.items())),
            "sha1": dict(sorted(self.sha1.items())),
        }


def _corrupt(path: Path, why) -> DatasetError:
    return DatasetError(
        f"{path} is corrupt ({why}); delete it to let microclf make a new split "
        "(the test set will then be drawn again)"
    )


def load_split(root: str | Path) -> Split | None:
    """The split stored in ``root/split.json`` (version 1 or 2), or None if there is none.

    A version-1 file (per-file assignments, no groups) loads with empty ``groups``;
    :func:`update_split` migrates it. A corrupt file or one of an unknown version raises a
    :class:`DatasetError` that says what to do.
    """
    path = Path(root) / SPLIT_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise TypeError("not a JSON object")
        version = d.get("version", 1)
    except (ValueError, TypeError, OSError) as exc:
        raise _corrupt(path, exc) from exc
    if version not in (1, 2) or isinstance(version, bool):
        raise DatasetError(
            f"{path} has version {version!r}, which this napari-microclf cannot read (it reads "
            "versions 1 and 2): update napari-microclf, or delete the file to let microclf "
            "make a new split (the test set will then be drawn again)"
        )
    try:
        assignments = {str(k): str(v) for k, v in d["assignments"].items()}
        bad = sorted({v for v in assignments.values() if v not in SUBSETS})
        if bad:
            raise ValueError(f"unknown subset(s) {bad}")
        split = Split(
            float(d["val_fraction"]),
            float(d["test_fraction"]),
            int(d["seed"]),
            assignments,
            version=int(version),
        )
        if version == 2:
            group_by = d["group_by"]
            if group_by is not None and not isinstance(group_by, str):
                raise TypeError(f"group_by is {group_by!r}")
            split.group_by = group_by
            split.groups = {str(k): str(v) for k, v in d["groups"].items() if k in assignments}
            split.sha1 = {str(k): str(v) for k, v in d.get("sha1", {}).items() if k in assignments}
        return split
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(path, exc) from exc


def _save_split(root: Path, split: Split) -> None:
    atomic_write_text(root / SPLIT_FILE, json.dumps(split.to_dict(), indent=1))


def _split_locked(fn):
    """Hold ``DATASET/.split.json.lock`` while ``fn(root, ...)`` reads and rewrites
    ``split.json``: two processes never update it at once (the second waits a few seconds,
    then gets a LockedError naming the first)."""

    @wraps(fn)
    def locked(root, *args, **kwargs):
        with split_lock(root, "microclf " + fn.__name__.strip("_").replace("_", " ")):
            return fn(root, *args, **kwargs)

    return locked


@_split_locked
def _rename_in_split(root: Path, old: str, new: str) -> None:
    split = load_split(root)
    if split is None:
        return

    def renamed(mapping: dict[str, str]) -> dict[str, str]:
        return {
            (f"{new}/{k.split('/', 1)[1]}" if k.split("/", 1)[0] == old else k): v
            for k, v in mapping.items()
        }

    split.assignments = renamed(split.assignments)
    split.groups = renamed(split.groups)  # a group is not named after the class: it follows
    split.sha1 = renamed(split.sha1)
    _save_split(root, split)


def _order_key(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def _class_of(key: str) -> str:
    return key.split("/", 1)[0]


def _compile_group_by(group_by: str | None) -> re.Pattern | None:
    if group_by is None:
        return None
    try:
        return re.compile(group_by)
    except (re.error, TypeError) as exc:
        raise DatasetError(
            f"group_by {group_by!r} is not a valid regular expression ({exc}); give a pattern "
            r"that matches the part of the file name shared by one source, e.g. "
            r"'^(plate\d+_well[A-Z]\d+)'"
        ) from exc


def grouping_text(group_by: str | None) -> str:
    """How the groups of a split are made, in words (for reports)."""
    return "source file" if group_by is None else f"file name pattern {group_by!r}"


def _digest(path: Path) -> str:
    try:
        return file_digest(path)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read ({exc}); fix or remove this file") from exc


def _file_group(
    path: Path, digest: str, pattern: re.Pattern | None, resolved: dict[str, str]
) -> str:
    """The recorded group of one file (see :class:`Split`); reads a TIFF's provenance."""
    if pattern is not None:
        m = pattern.search(path.name)
        text = (m.group(1) if pattern.groups else m.group(0)) if m else None
        return f"name:{text}" if text else f"file:{digest}"
    source = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            source = read_provenance(path).get("source")
        except Exception:  # noqa: BLE001 - an unreadable file has no provenance
            source = None
    if not source:
        return f"file:{digest}"
    text = str(source)
    if text not in resolved:
        try:
            resolved[text] = str(Path(text).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):
            resolved[text] = text
    return f"source:{resolved[text]}"


def _joined_groups(split: Split, keys) -> dict[str, str]:
    """``{key: group}`` for ``keys``, groups sharing a file content joined (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    own = {
        k: split.groups.get(k) or (f"file:{split.sha1[k]}" if k in split.sha1 else f"key:{k}")
        for k in keys
    }
    for k, g in own.items():
        a = find(g)
        if k in split.sha1:
            b = find(f"sha1:{split.sha1[k]}")
            if a != b:
                parent[a] = b
    best: dict[str, tuple[int, str]] = {}
    for g in set(own.values()):
        r = find(g)
        cand = (_GROUP_PRIORITY.get(g.split(":", 1)[0], 3), g)
        if r not in best or cand < best[r]:
            best[r] = cand
    return {k: best[find(g)][1] for k, g in own.items()}


def _describe_group(group: str, keys: list[str]) -> str:
    kind, _, text = group.partition(":")
    if kind == "source":
        return f"source {text}"
    if kind == "name":
        return f"file name group {text!r}"
    first = min(keys)
    return f"file {first}" + (" and its identical copies" if len(keys) > 1 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _assign(split: Split, keys: list[str], reason: str) -> tuple[list[str], int]:
    """Make every group whole, then assign the files not yet assigned. Returns a note for
    each group made whole and the number of files moved for that.

    A group whose assigned files are in several subsets goes whole to the most protected
    one: test if any of its files is in test, else val if any is in val, else train. Files of
    a group that already has a subset join it.

    The remaining (new) groups are taken largest first (sizes in powers of two; the seed
    orders groups of similar size) and each goes to the subset furthest below its target
    share for the classes of its files. For one class that is ``1 - held / target``, where
    ``target`` is the subset's share of the class's files (this group included) and
    ``held`` the class's files already in the subset, rounded up the Huntington-Hill way in
    units of this group's size (``m * sqrt(h * (h + 1))`` with ``h = held / m``). A subset
    without any file of the class is thus always furthest below, so as soon as a class has
    three groups each subset gets one; beyond that groups are shared in proportion. A group
    of several classes averages the measure over its files. Ties favour train, then val.
    Deterministic for a given seed; O(n log n).
    """
    gmap = _joined_groups(split, keys)
    members: dict[str, list[str]] = {}
    for k in keys:
        members.setdefault(gmap[k], []).append(k)
    notes: list[str] = []
    moved_total = 0
    new_groups = []
    for group, ks in members.items():
        held = {split.assignments[k] for k in ks if k in split.assignments}
        if not held:
            new_groups.append(group)
            continue
        target = "test" if "test" in held else "val" if "val" in held else "train"
        if len(held) > 1:
            moved: dict[str, int] = {}
            for k in ks:
                s = split.assignments.get(k)
                if s is not None and s != target:
                    moved[s] = moved.get(s, 0) + 1
            moved_total += sum(moved.values())
            straddled = "/".join(s for s in SUBSETS if s in held)
            what = ", ".join(
                f"{_plural(n, 'file')} moved from {s} to {target}" for s, n in sorted(moved.items())
            )
            notes.append(
                f"{reason}: {_describe_group(group, ks)} straddled {straddled}; "
                f"the whole group is now in {target} ({what})."
            )
        for k in ks:
            split.assignments[k] = target

    fractions = {
        "train": 1 - split.val_fraction - split.test_fraction,
        "val": split.val_fraction,
        "test": split.test_fraction,
    }
    open_subsets = [s for s in SUBSETS if fractions[s] > 0]
    counts: dict[str, dict[str, int]] = {}
    for k, s in split.assignments.items():
        counts.setdefault(_class_of(k), dict.fromkeys(SUBSETS, 0))[s] += 1
    new_groups.sort(
        key=lambda g: (-len(members[g]).bit_length(), _order_key(split.seed, min(members[g])))
    )
    for group in new_groups:
        ks = members[group]
        composition: dict[str, int] = {}
        for k in ks:
            composition[_class_of(k)] = composition.get(_class_of(k), 0) + 1
        for c in composition:
            counts.setdefault(c, dict.fromkeys(SUBSETS, 0))

        def score(s: str, ks=ks, composition=composition) -> tuple:
            total = 0.0
            for c, m in composition.items():
                n = sum(counts[c].values()) + m  # the class's files with this group
                held = counts[c][s] / m  # in units of this group's size
                total += m * (1 - m * math.sqrt(held * (held + 1)) / (fractions[s] * n))
            return (round(total / len(ks), 9), s == "train", -SUBSETS.index(s))

        subset = max(open_subsets, key=score)
        for k in ks:
            split.assignments[k] = subset
        for c, m in composition.items():
            counts[c][subset] += m
    return notes, moved_total


def _duplicate_notes(split: Split) -> list[str]:
    by_digest: dict[str, list[str]] = {}
    for k, d in split.sha1.items():
        if k in split.assignments:
            by_digest.setdefault(d, []).append(k)
    sets = sorted(sorted(ks) for ks in by_digest.values() if len(ks) > 1)
    notes = []
    for ks in sets[:_MAX_NOTES]:
        subsets = sorted({split.assignments[k] for k in ks}, key=SUBSETS.index)
        note = (
            f"Identical files (same bytes): {', '.join(ks)}; kept together in {'/'.join(subsets)}."
        )
        classes = sorted({_class_of(k) for k in ks})
        if len(classes) > 1:
            note += (
                f" They are in different classes ({', '.join(classes)}): at most one "
                "label is right; remove the wrong copy."
            )
        notes.append(note)
    if len(sets) > _MAX_NOTES:
        notes.append(
            f"... and {_plural(len(sets) - _MAX_NOTES, 'more set')} of identical files, "
            "each kept together in one subset."
        )
    return notes


@_split_locked
def update_split(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    resplit: bool = False,
    *,
    group_by: str | None = None,
) -> tuple[Split, list[str]]:
    """Load ``split.json``, assign new files, drop vanished ones, save; return (split, notes).

    The split is grouped: files of one group are always in the same subset, so pages of one
    stack never straddle train and test. A file's group is the source file named in its
    provenance (all pages and crops of one stack or image; sources compared by resolved
    path), or, with ``group_by`` (a regular expression searched in the file name), the first
    capture group of the match (the whole match if the pattern has no group). A file without
    provenance, or whose name does not match, is its own group. Files with identical bytes
    are one group too, whatever their names or classes. A group may hold several classes.

    Each file's group and sha1 are recorded in ``split.json`` when the file is first seen,
    so provenance is read once per new file. New files of a group that already has a subset
    join it; new groups are assigned by the stratified greedy rule of :func:`_assign`;
    already assigned files never move, except to keep a group whole: a group found in
    several subsets (an old version-1 split, a changed ``group_by``, or a new file that is a
    copy of a file in another group) goes whole to test if any of its files is in test, else
    to val if any is in val; each such case is reported in a note. So a test file never
    moves into training.

    An existing split keeps its fractions and seed (a note says so when the arguments
    differ); ``resplit=True`` draws a new one. A changed ``group_by`` recomputes the groups.
    The notes also name every set of identical files, and (with ``group_by``) how many file
    names did not match the pattern.
    """
    root = Path(root)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError("validation and test fractions must be in [0, 1) and sum below 1")
    pattern = _compile_group_by(group_by)
    notes: list[str] = []
    split = None if resplit else load_split(root)
    regrouped = False
    if split is None:
        split = Split(val_fraction, test_fraction, seed, group_by=group_by)
    else:
        if (split.val_fraction, split.test_fraction, split.seed) != (
            val_fraction,
            test_fraction,
            seed,
        ):
            notes.append(
                f"Reusing the split stored in {root / SPLIT_FILE} (val "
                f"{split.val_fraction:.0%}, test {split.test_fraction:.0%}, seed {split.seed}) "
                "so the test set stays unseen; use a new split (--resplit) to change it."
            )
        if split.group_by != group_by and split.version >= 2:
            regrouped = True
            notes.append(
                f"Grouping changed from {grouping_text(split.group_by)} to "
                f"{grouping_text(group_by)}: the groups of all files were recomputed."
            )
        if split.group_by != group_by:
            split.groups = {}
            split.group_by = group_by
    before = split.to_dict() if split.version >= 2 else None

    current = {f"{c}/{p.name}": p for c in list_classes(root) for p in class_files(root, c)}
    split.assignments = {k: v for k, v in split.assignments.items() if k in current}
    split.groups = {k: v for k, v in split.groups.items() if k in current}
    split.sha1 = {k: v for k, v in split.sha1.items() if k in current}
    ungrouped = sum(k not in split.groups for k in split.assignments)
    resolved: dict[str, str] = {}
    for key in sorted(current):
        if key not in split.sha1:
            split.sha1[key] = _digest(current[key])
        if key not in split.groups:
            split.groups[key] = _file_group(current[key], split.sha1[key], pattern, resolved)

    migrating = split.version < 2 or (ungrouped and not regrouped)
    reason = (
        "split.json upgrade" if migrating else "Regrouping" if regrouped else "Keeping groups whole"
    )
    group_notes, moved = _assign(split, sorted(current), reason)
    if migrating:
        notes.append(
            (
                f"Upgraded {root / SPLIT_FILE} to version 2 (a grouped split): the groups of "
                if split.version < 2
                else f"{root / SPLIT_FILE}: the groups of "
            )
            + f"{_plural(ungrouped, 'assigned file')} were recorded; "
            + (
                f"{_plural(len(group_notes), 'group')} straddled subsets and were made whole, "
                f"{_plural(moved, 'file')} moved towards test (none out of test)."
                if group_notes
                else "no group straddled subsets, no file moved."
            )
        )
    notes += group_notes[:_MAX_NOTES]
    if len(group_notes) > _MAX_NOTES:
        notes.append(
            f"{reason}: {_plural(len(group_notes) - _MAX_NOTES, 'more group')} made "
            "whole the same way (towards test, never out of test)."
        )
    if before is None or split.to_dict() != before or not (root / SPLIT_FILE).exists():
        _save_split(root, split)
        split.version = SPLIT_VERSION
    notes += _duplicate_notes(split)
    if pattern is not None:
        unmatched = sorted(k for k, g in split.groups.items() if not g.startswith("name:"))
        if unmatched:
            notes.append(
                f"{_plural(len(unmatched), 'file name')} did not match the group_by pattern "
                f"{group_by!r} (e.g. {unmatched[0]}); each such file is its own group."
            )
    return split, notes


def split_manifest(root: str | Path, split: Split) -> dict[str, list[dict]]:
    """The files a split assigns, per subset, for a model bundle to keep.

    ``{subset: [{"key": "<class>/<file>", "sha1": <sha1 of the file's bytes now>,
    "group": <group>}, ...]}`` for each assigned file that exists, sorted by key; groups are
    those of :meth:`Split.group_map` (identical files joined).
    """
    root = Path(root)
    groups = split.group_map()
    out: dict[str, list[dict]] = {s: [] for s in SUBSETS}
    for key in sorted(split.assignments):
        path = root / key
        if path.is_file():
            out[split.assignments[key]].append(
                {"key": key, "sha1": _digest(path), "group": groups[key]}
            )
    return out


# -- samples for training ---------------------------------------------------------------


@dataclass
class DatasetSamples:
    """The labelled pages of each subset, the split they come from, and a report on it.

    ``image_counts[subset][class]`` counts images (pages) and ``group_counts[subset][class]``
    the groups with an image of that class in the subset; ``subset_groups[subset]`` counts
    the groups of a subset (a group holding several classes counted once) and
    ``class_groups[class]`` the groups holding images of a class. ``notes`` are informative
    (a reused split, a migration, identical files); ``warnings`` say where the test accuracy
    rests on too few groups. :meth:`split_lines` puts it all in words.
    """

    class_names: list[str]
    train: list[PageRef]
    val: list[PageRef]
    test: list[PageRef]
    split: Split
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    image_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    group_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    subset_groups: dict[str, int] = field(default_factory=dict)
    class_groups: dict[str, int] = field(default_factory=dict)

    def distribution(self, subset: str = "train") -> dict[int, int]:
        refs = getattr(self, subset)
        return {i: sum(r.label == i for r in refs) for i in range(len(self.class_names))}

    def split_lines(self) -> list[str]:
        """The split in words: one summary line, one line per class, then the warnings.

        e.g. ``Split: train 210 images in 14 groups, val 60 in 4, test 30 in 2 (grouped by
        source file)``. The warning lines start with ``Warning:`` and are the items of
        ``warnings``, so a caller can show them as warnings.
        """

        def counts(images: dict[str, int], groups: dict[str, int]) -> str:
            first, *rest = SUBSETS
            return ", ".join(
                [f"{first} {_plural(images[first], 'image')} in {_plural(groups[first], 'group')}"]
                + [f"{s} {images[s]} in {groups[s]}" for s in rest]
            )

        totals = {s: sum(self.image_counts.get(s, {}).values()) for s in SUBSETS}
        lines = [
            f"Split: {counts(totals, self.subset_groups)} "
            f"(grouped by {grouping_text(self.split.group_by)})"
        ]
        for c in self.class_names:
            lines.append(
                f"  class {c!r}: "
                + counts(
                    {s: self.image_counts[s].get(c, 0) for s in SUBSETS},
                    {s: self.group_counts[s].get(c, 0) for s in SUBSETS},
                )
            )
        return lines + list(self.warnings)


def check_dataset(root: str | Path) -> list[str]:
    """Classes of a dataset fit for training, or a DatasetError saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; create class folders "
            "(dataset/<class>/<images>) or use the Annotate widget"
        )
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
    for c in counts:
        if c.casefold() in RESERVED_CLASS_NAMES:
            raise DatasetError(f"{root}: {_reserved_text(c)} (rename the folder)")
        if other := _same_name(root, c):
            raise DatasetError(
                f"class folders {other!r} and {c!r} in {root} differ only in case (one folder "
                "on Windows and macOS, two classes here); merge them or rename one"
            )
    return list(counts)


def _split_warnings(
    split: Split, classes: list[str], class_groups: dict[str, int], test_groups: dict[str, int]
) -> list[str]:
    out = []
    for c in classes:
        n, t = class_groups.get(c, 0), test_groups.get(c, 0)
        if split.test_fraction > 0 and n < 3 and t == 0:
            out.append(
                f"Warning: class {c!r} has only {_plural(n, 'group')} and none in the "
                "test set, so it has no test accuracy; add images from more sources."
            )
        elif split.test_fraction > 0 and n < 3:
            rests = "one source" if t == 1 else f"{t} sources"
            out.append(
                f"Warning: class {c!r} has only {_plural(n, 'group')}: its test set "
                f"holds {_plural(t, 'group')}, so its test accuracy rests on {rests}."
            )
        elif split.test_fraction > 0 and t == 0:
            out.append(
                f"Warning: class {c!r} has no group in the test set (its {n} groups "
                "are all in train or val), so it has no test accuracy; add images "
                "from more sources or draw a new split."
            )
        elif n < 3:
            out.append(
                f"Warning: class {c!r} has only {_plural(n, 'group')}, so its "
                "validation accuracy rests on few sources."
            )
    return out


def load_samples(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    resplit: bool = False,
    *,
    group_by: str | None = None,
) -> DatasetSamples:
    """Check the dataset, update its (grouped) split, and expand files into labelled pages.

    ``group_by`` is passed to :func:`update_split`. The result carries the split report:
    images and groups per subset and class, and warnings for classes whose test accuracy
    rests on fewer than 3 groups or on none.
    """
    root = Path(root)
    classes = check_dataset(root)
    split, notes = update_split(root, val_fraction, test_fraction, seed, resplit, group_by=group_by)
    subsets: dict[str, list[PageRef]] = {s: [] for s in SUBSETS}
    groups = split.group_map()
    image_counts = {s: dict.fromkeys(classes, 0) for s in SUBSETS}
    subset_class_groups: dict[str, dict[str, set]] = {
        s: {c: set() for c in classes} for s in SUBSETS
    }
    for key, subset in sorted(split.assignments.items()):
        cls, name = key.split("/", 1)
        path = root / cls / name
        try:
            n = count_pages(path)
        except ImageReadError as exc:
            raise DatasetError(f"{exc} (in class {cls!r}; fix or remove this file)") from exc
        for i in range(n):
            subsets[subset].append(PageRef(path, i, classes.index(cls), {"key": key}))
        image_counts[subset][cls] += n
        subset_class_groups[subset][cls].add(groups[key])
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
    group_counts = {s: {c: len(g) for c, g in subset_class_groups[s].items()} for s in SUBSETS}
    subset_groups = {s: len(set().union(*subset_class_groups[s].values())) for s in SUBSETS}
    class_groups = {
        c: len(set().union(*(subset_class_groups[s][c] for s in SUBSETS))) for c in classes
    }
    warnings = _split_warnings(split, classes, class_groups, group_counts["test"])
    return DatasetSamples(
        classes,
        subsets["train"],
        subsets["val"],
        subsets["test"],
        split,
        notes,
        warnings,
        image_counts,
        group_counts,
        subset_groups,
        class_groups,
    )
