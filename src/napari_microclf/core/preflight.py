"""Checks before a training does any TensorFlow work: every problem early, named, with what
to do.

:func:`preflight` is what :func:`~napari_microclf.core.train.train` calls first (so the
command line, the Python API and the Train widget all get it); each check is callable
alone:

- :func:`check_out_dir`: the model folder is a folder (or can be created) and writable.
- :func:`check_dataset_writable`: the dataset can hold its ``split.json``, or, read-only,
  already holds one that lists exactly its files (then nothing needs writing).
- :func:`scan_images`: one pass over every image's header (no pixel data decoded: about
  0.1 ms a file) that lists all unreadable, truncated and too small images at once, by
  file, and warns about very elongated ones.

Errors are :class:`~napari_microclf.core.errors.MicroclfError` subclasses whose message says
what to do; :func:`user_message` gives the one-line text of any error a user can fix.
"""

from __future__ import annotations

import errno
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import is_foreign_folder
from .dataset import (
    SPLIT_FILE,
    SPLIT_VERSION,
    check_dataset,
    class_files,
    list_classes,
    load_split,
    nested_image_folders,
)
from .errors import BundleError, DatasetError, ImageReadError, MicroclfError, OutputError
from .files import refuse_destroying
from .images import aspect_warning, read_header, shape_problem
from .lock import refuse_if_locked

MAX_LISTED = 10  # files named in one message; the rest are counted


def _probe(folder: Path) -> OSError | None:
    """Create and delete a file in ``folder``; the error if that is impossible."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".microclf-probe-"):
            pass
    except OSError as exc:
        return exc
    return None


def _why(exc: OSError) -> str:
    return {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the disk",
        errno.EDQUOT: "disk quota exceeded",
    }.get(exc.errno, exc.strerror or str(exc))


def check_out_dir(out: str | Path) -> Path:
    """The model folder ``out`` is a folder, or can be created, and can be written.

    Creates nothing. Raises :class:`OutputError` (or :class:`BundleError` for a folder of
    other files that is not a model folder)::

        model folder /data/notes.txt is a file; choose a folder for the model
        cannot create model folder /ro/model: permission denied in /ro; choose a writable folder
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"model folder {out} is a file; choose a folder for the model")
    if out.is_dir():
        if is_foreign_folder(out):
            raise BundleError(
                f"{out} exists and is not a microclf model folder; choose another "
                "output folder (nothing was written)"
            )
        problem = _probe(out)
        if problem is not None:
            raise OutputError(
                f"cannot write into model folder {out}: {_why(problem)}; choose a writable folder"
            )
        return out
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot create model folder {out}: {parent} is a file; choose another folder"
        )
    problem = _probe(parent)
    if problem is not None:
        raise OutputError(
            f"cannot create model folder {out}: {_why(problem)} in {parent}; "
            "choose a writable folder"
        )
    return out


def _split_is_current(root: Path, group_by: str | None) -> str | None:
    """None if ``root/split.json`` lists exactly the dataset's files (so a training writes
    nothing there), else what is missing, in words."""
    split = load_split(root)
    if split is None:
        return f"has no {SPLIT_FILE} yet"
    current = {f"{c}/{p.name}" for c in list_classes(root) for p in class_files(root, c)}
    stored = set(split.assignments)
    if split.version < SPLIT_VERSION:
        return f"has an old {SPLIT_FILE} (version {split.version}) that needs an upgrade"
    if split.group_by != group_by:
        return f"has a {SPLIT_FILE} grouped differently (group_by {split.group_by!r})"
    new, gone = sorted(current - stored), sorted(stored - current)
    if new or gone or set(split.groups) != stored or set(split.sha1) != stored:
        parts = ([f"{len(new)} new file(s) (e.g. {new[0]})"] if new else []) + (
            [f"{len(gone)} removed file(s) (e.g. {gone[0]})"] if gone else []
        )
        return f"has a {SPLIT_FILE} that misses " + (" and ".join(parts) or "file groups")
    return None


def check_dataset_writable(
    data_dir: str | Path, resplit: bool = False, group_by: str | None = None
) -> str | None:
    """The dataset can hold its ``split.json``; returns a note when it is read-only but its
    split is current (the training reads it and writes nothing there).

    Raises :class:`OutputError` saying how to proceed when the split must be written and
    cannot be.
    """
    root = Path(data_dir).expanduser()
    problem = _probe(root)
    if problem is None:
        return None
    why = _why(problem)
    todo = "make it writable, or copy the dataset to a writable folder and train on the copy"
    if resplit:
        raise OutputError(
            f"dataset {root} cannot be written ({why}), and a new split writes "
            f"{root / SPLIT_FILE}: {todo}"
        )
    stale = _split_is_current(root, group_by)
    if stale is not None:
        raise OutputError(
            f"dataset {root} cannot be written ({why}) and {stale}, where "
            f"microclf keeps the train/validation/test split: {todo}"
        )
    return (
        f"Dataset {root} is read-only ({why}); its {SPLIT_FILE} is current and is used as "
        "it is (the feature cache cannot be kept there)."
    )


@dataclass
class ImageScan:
    """What :func:`scan_images` found: problems (``(path, reason)``) and warnings."""

    files: int = 0
    pages: int = 0
    seconds: float = 0.0
    problems: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, root: str | Path) -> DatasetError | None:
        """One error listing the problems (the first :data:`MAX_LISTED`), or None."""
        if not self.problems:
            return None
        root = Path(root)
        todo = (
            "fix or re-export the file(s), or move them out of the dataset folder "
            f"{root}, then train again"
        )
        if any("channel map" in why for _, why in self.problems):
            todo += " (or choose another channel map)"
        lines = [f"{_rel(p, root)}: {why}" for p, why in self.problems[:MAX_LISTED]]
        if len(self.problems) == 1:
            return DatasetError(f"{lines[0]}; {todo}")
        rest = len(self.problems) - MAX_LISTED
        return DatasetError(
            f"{len(self.problems)} of the {self.files} image files cannot be used for "
            f"training; {todo}:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {rest} more" if rest > 0 else "")
        )


def _map_text(channel_map) -> str:
    return ",".join("-" if c is None else str(c) for c in channel_map)


def _plural_folders(n: int) -> str:
    return "1 folder" if n == 1 else f"{n} folders"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def scan_images(data_dir: str | Path, channel_map=None) -> ImageScan:
    """Every class image's header and page shape, checked without decoding pixel data.

    Problems (the image cannot be used): unreadable or not an image, empty, truncated
    (TIFF: its header points past the end of the file), a page too small
    (:func:`~napari_microclf.core.images.shape_problem`), fewer channels than
    ``channel_map`` uses. Warnings: a page with an aspect
    ratio above :data:`~napari_microclf.core.images.MAX_ASPECT` (a thin line once padded;
    cheap, as pages are resized before padding), and what tifffile logged about a damaged
    page list. Boolean (mask) images are fine: they are read as 0/1.
    """
    root = Path(data_dir).expanduser()
    used = [c for c in (channel_map or ()) if c is not None]
    needed = max(used) + 1 if used else 1
    scan = ImageScan()
    t0 = time.perf_counter()
    elongated = []
    for c in list_classes(root):
        for path in class_files(root, c):
            scan.files += 1
            try:
                info, notes = read_header(path)
            except ImageReadError as exc:
                scan.problems.append((path, str(exc).removeprefix(f"{path}: ")))
                continue
            scan.pages += info.n_pages
            small = shape_problem(info.page_shape)
            if small is not None:
                scan.problems.append((path, small))
                continue
            if info.n_channels < needed:
                scan.problems.append(
                    (
                        path,
                        f"{info.n_channels} channel(s), but the channel "
                        f"map {_map_text(channel_map)} uses channel {needed - 1}"
                        " (channels count from 0)",
                    )
                )
                continue
            warning = aspect_warning(info.page_shape, _rel(path, root))
            if warning is not None:
                elongated.append(warning)
            if notes:
                scan.warnings.append(
                    f"{_rel(path, root)}: damaged TIFF ({notes[0]}); "
                    f"{info.n_pages} page(s) can be read: re-export it if "
                    "it should have more"
                )
    nested = nested_image_folders(root)
    if nested:
        scan.warnings.append(
            f"{_plural_folders(len(nested))} inside class folders hold images that are not "
            f"trained on ({', '.join(nested[:MAX_LISTED])}"
            + (", ..." if len(nested) > MAX_LISTED else "")
            + "): a class is the images directly in its folder; move them up to use them"
        )
    scan.warnings += elongated[:MAX_LISTED]
    if len(elongated) > MAX_LISTED:
        scan.warnings.append(
            f"... and {len(elongated) - MAX_LISTED} more images with an aspect ratio above 20"
        )
    scan.seconds = time.perf_counter() - t0
    return scan


@dataclass
class PreflightResult:
    """What :func:`preflight` found fine but worth saying (warnings and notes)."""

    warnings: list[str]
    notes: list[str]
    scan: ImageScan


def check_folders(config) -> str | None:
    """The checks of :func:`preflight` but the images' (quick: for a widget's Start): the
    dataset, the model folder (never the dataset, inside it or above it, nor the working
    directory; writable; not being written by another training) and the dataset's
    ``split.json``. Returns the split's note, if any."""
    check_dataset(config.data_dir)
    refuse_destroying(config.out_dir, protected=[config.data_dir], what="model folder")
    check_out_dir(config.out_dir)
    refuse_if_locked(config.out_dir)
    return check_dataset_writable(config.data_dir, config.resplit, config.group_by)


def preflight(config) -> PreflightResult:
    """All checks of a :class:`~napari_microclf.core.train_config.TrainConfig`, before TensorFlow.

    Raises the first failing check's error: the dataset exists with two classes or more
    (:class:`DatasetError`), the model folder (:class:`OutputError`: not the dataset, inside
    it or above it, nor the working directory; :class:`LockedError` while another training
    writes it), the dataset's
    ``split.json`` (:class:`OutputError`), then every image at once (one
    :class:`DatasetError` naming up to :data:`MAX_LISTED` files and counting the rest).
    """
    note = check_folders(config)
    scan = scan_images(config.data_dir, config.channel_map)
    error = scan.error(config.data_dir)
    if error is not None:
        raise error
    notes = ([note] if note else []) + [
        f"Checked {scan.files} image file(s) ({scan.pages} page(s)) in {scan.seconds:.1f}s"
    ]
    return PreflightResult(scan.warnings, notes, scan)


# Errors of the environment, not of microclf: said in one line, without a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EIO,
    errno.ENAMETOOLONG,
    errno.EMFILE,
}


def user_message(exc: BaseException) -> str | None:
    """The one-line text of an error the user can act on, or None for an unexpected one.

    Ours (:class:`MicroclfError`) give their message; an ``OSError`` of the environment (disk
    full, permission denied, a missing or read-only path) is said with its file and what to
    do. Anything else is a bug and deserves its traceback.
    """
    if isinstance(exc, MicroclfError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        todo = {
            errno.ENOSPC: "free some disk space or choose another folder",
            errno.EDQUOT: "free some space or choose another folder",
            errno.EMFILE: "close other programs and try again",
            errno.EIO: "check the disk or network share",
        }.get(exc.errno, "check the path and its permissions")
        return f"{_why(exc)}{where}; {todo}"
    return None
