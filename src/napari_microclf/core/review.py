"""Error review: the images behind a cell of the confusion matrix, and fixing their labels.

A test report (``report.json`` of a model folder, or a dated one in its ``reports/``) lists
every scored page with its true and predicted class (``report["pages"]``). The cell
(true, predicted) of the confusion matrix is :func:`cell_pages`; :func:`page_stack` makes one
display stack of those pages (each page normalised on its own and padded to the largest), with
``origins`` naming the file and page behind each stack page.

Fixing a label goes through the dataset: :func:`relabel_example` moves the file into another
class folder and renames its entry in ``split.json`` (same subset, same group), under the
split lock, so a test image stays a test image and its stack's other pages keep their
subset; :func:`trash_example` moves it into ``.trash`` and drops it from the split. Neither
deletes or overwrites anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import (
    TRASH_DIR,
    _save_split,
    _unique,
    add_class,
    check_class_name,
    list_classes,
    load_split,
)
from .errors import BundleError, DatasetError
from .images import count_pages, normalize_percentile, read_page
from .lock import split_lock


def load_report(path: str | Path) -> dict:
    """A report from a model folder (its ``report.json``) or a report ``.json`` file."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise BundleError(
            f"{path} has no test report (report.json); train a model there or "
            f"run `microclf evaluate {path}`"
        )
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BundleError(
            f"{file} is not a readable report ({exc}); run `microclf evaluate "
            f"{path}` to write a new one"
        ) from exc
    if not isinstance(report, dict) or "confusion_matrix" not in report:
        raise BundleError(f"{file} is not a test report (no confusion matrix)")
    return report


def cell_pages(report: dict, true: str, predicted: str) -> list[dict]:
    """The pages of the confusion-matrix cell (``true``, ``predicted``), lowest confidence
    first: dicts with ``file``, ``page``, ``true``, ``predicted`` and ``confidence``.

    Reports written before every page was listed hold only the misclassified pages: a
    diagonal cell of such a report raises a :class:`BundleError` that says how to refresh it.
    """
    names = report.get("class_names") or []
    for name in (true, predicted):
        if name not in names:
            raise DatasetError(f"{name!r} is not a class of this report ({', '.join(names)})")
    pages = report.get("pages")
    if pages is None:
        if true == predicted:
            raise BundleError(
                "this report lists only the misclassified images; run "
                "`microclf evaluate MODEL` (or retrain) to list every test image"
            )
        pages = report.get("misclassified") or []
    out = [
        dict(p)
        for p in pages
        if p.get("true") == true and p.get("predicted") == predicted and "file" in p
    ]
    return sorted(out, key=lambda p: (p["confidence"], p["file"], p.get("page", 0)))


def locate(entry: dict, data_dir: str | Path | None = None) -> Path | None:
    """Where the entry's file is now: its recorded path, else the same file name in another
    class folder of ``data_dir`` (it was relabelled since), else None (gone)."""
    path = Path(entry["file"])
    if path.is_file():
        return path
    root = Path(data_dir) if data_dir else path.parent.parent
    for c in list_classes(root):
        cand = root / c / path.name
        if cand.is_file():
            return cand
    return None


@dataclass
class PageStack:
    """Pages of several files as one display stack ``(N, Y, X)`` or ``(N, Y, X, 3)``."""

    data: np.ndarray  # float32 in [0, 1]; each page normalised on its own, padded with 0
    origins: list[dict]  # per stack page: {"file", "page", "pages" (of the file), "shape"}


def _display_page(page: np.ndarray, rgb: bool) -> np.ndarray:
    page = np.asarray(page)
    norm = normalize_percentile(page) / 255.0
    if rgb:
        return norm[..., :3] if norm.shape[-1] >= 3 else np.repeat(norm[..., :1], 3, axis=-1)
    return norm[..., 0]


def page_stack(entries: list[dict], max_side: int = 1024) -> PageStack:
    """Read the pages ``entries`` name (``file``, ``page``) into one display stack.

    RGB when every page has three or more channels, else the first channel. Pages larger than
    ``max_side`` are shown subsampled (the dataset files are never changed). A page that
    cannot be read raises an :class:`ImageReadError` naming its file.
    """
    pages = [np.asarray(read_page(e["file"], int(e.get("page", 0)))) for e in entries]
    if not pages:
        return PageStack(np.zeros((0, 2, 2), np.float32), [])
    rgb = all(p.ndim == 3 and p.shape[-1] >= 3 for p in pages)
    shown, origins = [], []
    for e, p in zip(entries, pages, strict=True):
        step = max(1, int(np.ceil(max(p.shape[:2]) / max_side)))
        shown.append(_display_page(p[::step, ::step], rgb))
        origins.append(
            {
                "file": str(e["file"]),
                "page": int(e.get("page", 0)),
                "pages": count_pages(e["file"]),
                "shape": [int(p.shape[0]), int(p.shape[1])],
            }
        )
    h = max(s.shape[0] for s in shown)
    w = max(s.shape[1] for s in shown)
    data = np.zeros((len(shown), h, w) + ((3,) if rgb else ()), np.float32)
    for i, s in enumerate(shown):
        data[i, : s.shape[0], : s.shape[1]] = s
    return PageStack(data, origins)


# -- fixing labels ------------------------------------------------------------------------


def _key(root: Path, path: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError as exc:
        raise DatasetError(f"{path} is not in the dataset {root}") from exc
    if len(rel.parts) != 2:
        raise DatasetError(f"{path} is not an example of a class folder of {root}")
    return rel.as_posix()


def relabel_example(root: str | Path, path: str | Path, new_class: str) -> Path:
    """Move the example ``path`` into class ``new_class`` of the dataset ``root``.

    The file keeps its name (a free one if taken) and its place in ``split.json``: same
    subset, same group, same content hash, so a test image stays a test image. The move is a
    rename within the dataset (atomic), done while holding the split lock; the class folder
    is created if needed. Returns the new path.
    """
    root, path = Path(root), Path(path)
    new_class = check_class_name(new_class)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (moved or deleted since the report)")
    old_key = _key(root, path)
    if old_key.split("/", 1)[0] == new_class:
        return path
    folder = add_class(root, new_class)
    dst = _free_name(folder / path.name)
    _move_in_split(root, path, dst, old_key, f"{new_class}/{dst.name}")
    return dst


def trash_example(root: str | Path, path: str | Path) -> Path:
    """Move the example ``path`` into ``root/.trash/<class>/`` and drop it from the split."""
    root, path = Path(root), Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (moved or deleted since the report)")
    old_key = _key(root, path)
    dst = _free_name(root / TRASH_DIR / path.parent.name / path.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _move_in_split(root, path, dst, old_key, None)
    return dst


def _free_name(path: Path) -> Path:
    return _unique(path)


def _move_in_split(root: Path, src: Path, dst: Path, old_key: str, new_key: str | None) -> None:
    """Rename ``src`` to ``dst`` and its split entry ``old_key`` to ``new_key`` (None: drop
    it), holding the split lock so no training reads the split between the two."""
    with split_lock(root, "microclf review"):
        split = load_split(root)
        if dst.exists():  # never overwrite, even if the name was taken a moment ago
            raise DatasetError(f"{dst} appeared while moving {src.name}; try again")
        os.rename(src, dst)  # same file system: atomic
        if split is None or old_key not in split.assignments:
            return
        for mapping in (split.assignments, split.groups, split.sha1):
            if old_key in mapping:
                value = mapping.pop(old_key)
                if new_key is not None:
                    mapping[new_key] = value
        try:
            _save_split(root, split)
        except OSError:
            os.rename(dst, src)  # the split could not follow: put the file back
            raise
