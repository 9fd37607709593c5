"""The predictions CSV: its columns, its cells, writing it, and reading an interrupted run's
rows back.

One row per page: ``file``, ``page``, ``class``, ``confidence``, one probability column per
class (``p_<class>``, :func:`prob_column`, so no class name can take a fixed column's place),
``unfamiliar`` (the score, where the model has a familiarity description), and for folder
runs ``status`` (``ok`` or ``error``) and ``error`` (the reason, one line). UTF-8 with
``\\r\\n`` line ends; a text cell that a spreadsheet would run as a formula gets a leading
``'`` (:func:`csv_cell`). A complete CSV is written atomically (:func:`write_csv`); a folder run
streams its rows to ``<csv>.partial`` (:mod:`.folder_runs`), which :func:`read_partial` reads
back to resume it.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import OutputError
from .files import mkstemp_for_user
from .predict_options import DEFAULTS
from .results import FileError, FolderResult, ObjectPrediction, PagePrediction

# Cells a spreadsheet program would run as a formula (OWASP, "CSV Injection"): these starts.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value) -> str:
    """``value`` as a CSV cell that spreadsheets show as text, never run as a formula.

    Text starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'``
    (OWASP's advice), unless it is a plain number such as ``-0.5``.
    """
    text = str(value)
    if text.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


PROB_PREFIX = "p_"  # a class's probability column: p_<class>, never a fixed column's name


def prob_column(class_name: str) -> str:
    """The CSV column of ``class_name``'s probability: ``p_round`` for ``round``. Fixed
    columns never start with ``p_``, so a class named ``status`` or ``unfamiliar`` cannot
    take their place (``p_status`` is its probability)."""
    return PROB_PREFIX + class_name


OBJECT_COLUMNS = ("centroid_y", "centroid_x", "area")  # after the probabilities, for objects


def csv_header(
    class_names: Sequence[str], status: bool, unfamiliar: bool = False, objects: bool = False
) -> list[str]:
    """The columns; ``objects``: a ``label`` column after ``page`` and the object's centroid
    and area after the probabilities (one row per object)."""
    return [
        "file",
        "page",
        *(["label"] if objects else []),
        "class",
        "confidence",
        *(prob_column(c) for c in class_names),
        *(OBJECT_COLUMNS if objects else []),
        *(["unfamiliar"] if unfamiliar else []),
        *(["status", "error"] if status else []),
    ]


def csv_row(
    item: PagePrediction | FileError,
    class_names: Sequence[str],
    threshold: float,
    status: bool,
    unfamiliar: bool = False,
    objects: bool = False,
) -> list:
    if isinstance(item, FileError):
        if not status:
            raise ValueError(
                f"{item}: a FileError needs the status and error columns (status=True)"
            )
        return [
            item.path,
            "" if item.page is None else item.page,
            *([""] if objects else []),
            "",
            "",
            *("" for _ in class_names),
            *("" for _ in OBJECT_COLUMNS if objects),
            *([""] if unfamiliar else []),
            "error",
            item.message,
        ]
    score = item.unfamiliar_score
    where = []
    if objects:
        where = [f"{item.centroid[0]:.1f}", f"{item.centroid[1]:.1f}", item.area]
    return [
        item.file or "",
        item.page,
        *([item.object_label] if objects else []),
        item.label(threshold),
        f"{item.confidence:.4f}",
        *(f"{item.probabilities[c]:.4f}" for c in class_names),
        *where,
        *([("" if score is None else f"{score:.4f}")] if unfamiliar else []),
        *(["ok", ""] if status else []),
    ]


def write_csv_rows(path: str | Path, rows: Iterable[Sequence]) -> int:
    """Write ``rows`` (header included) atomically: UTF-8, ``newline=""``, every cell made safe.

    Returns the number of rows written after the header.
    """
    path = Path(path)
    fd, tmp = mkstemp_for_user(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            for row in rows:
                w.writerow([csv_cell(v) for v in row])
                written += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return max(written - 1, 0)


def write_csv(
    predictions: Iterable[PagePrediction | FileError],
    path: str | Path,
    class_names: Sequence[str],
    threshold: float = DEFAULTS.threshold,
    *,
    status: bool | None = None,
    unfamiliar: bool | None = None,
    objects: bool | None = None,
) -> int:
    """CSV with file, page, class, confidence and one probability column per class
    (``p_<class>``: a class name never collides with a fixed column).

    With ``unfamiliar`` (the default when a prediction has an ``unfamiliar_score``, i.e. the
    model has a familiarity description) a column ``unfamiliar`` after the probabilities
    holds the score (above 1: unlike the training images; the class then reads
    ``unfamiliar``); empty for pages without a score.

    Objects (``objects``, the default when an item is an :class:`ObjectPrediction`; one row
    each) add a ``label`` column (the object's label id) after ``page`` and ``centroid_y``,
    ``centroid_x`` and ``area`` (pixels) after the probabilities.

    With ``status`` (the default when ``predictions`` is a :class:`FolderResult` or holds a
    :class:`FileError`) two more columns: ``status`` (``ok`` or ``error``) and ``error`` (the
    reason, one line); a FileError becomes a row with empty class and probabilities. A
    FolderResult writes its pages, then its errors.

    UTF-8 with ``\\r\\n`` line ends on every platform; text cells that start like a formula
    (``=``, ``+``, ``-``, ``@``, tab, CR: class names come from folder names, file names from
    users) are written with a leading ``'`` (see :func:`csv_cell`). Written to a temporary
    file and renamed, so a failure leaves an earlier CSV intact. Returns the row count.
    """
    if isinstance(predictions, FolderResult):
        items: list = [*predictions.predictions, *predictions.errors]
        status = True if status is None else status
    else:
        items = list(predictions)
    if status is None:
        status = any(isinstance(i, FileError) for i in items)
    if unfamiliar is None:
        unfamiliar = any(getattr(i, "unfamiliar_score", None) is not None for i in items)
    if objects is None:
        objects = any(isinstance(i, ObjectPrediction) for i in items)

    def rows():
        yield csv_header(class_names, status, unfamiliar, objects)
        for item in items:
            yield csv_row(item, class_names, threshold, status, unfamiliar, objects)

    return write_csv_rows(path, rows())


def check_csv_destination(path: str | Path) -> Path:
    """``path`` if a CSV can be written there, else an OutputError saying what to do.

    Checked before any model is loaded: the path is not a folder, its folder exists and a file
    can be created in it (tried, not guessed from permission bits).
    """
    text = str(path).strip()
    if not text:
        raise OutputError("no CSV file name given; choose where to write the predictions")
    path = Path(text).expanduser()
    if path.is_dir():
        raise OutputError(
            f"CSV destination {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}"
        )
    folder = path.parent
    if not folder.exists():
        raise OutputError(
            f"cannot write {path}: the folder {folder} does not exist; create it "
            f"(mkdir -p {folder}) or choose another CSV path"
        )
    if not folder.is_dir():
        raise OutputError(
            f"cannot write {path}: {folder} is a file, not a folder; choose another CSV path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: no permission to create files in {folder} "
            f"({exc.strerror or exc}); choose a CSV path in a folder you can "
            "write to"
        ) from exc
    os.close(fd)
    os.unlink(probe)
    return path


# -- resuming: an interrupted run's .partial CSV read back ----------------------------


def resume_start(pages: set[int] | None) -> int:
    """The first page of a file still to classify: the interrupted run wrote pages in
    order, so its pages of the file are ``0 .. n - 1``."""
    n = 0
    while pages and n in pages:
        n += 1
    return n


def read_partial(partial: Path, header: list[str]) -> tuple[dict, set, int] | None:
    """What an interrupted run wrote to ``partial``: ``(done, failed, rows)``, with ``done``
    the pages written per file (as the CSV's file cell) and ``failed`` the files with an
    error row; None when there is no such file or not even its header.

    A torn last record (the run killed mid-write) is cut off the file, so rows appended next
    start on a line of their own: records end with ``\r\n``, which a file name's own line
    break (quoted, ``\n``) is not; any record still without every column is dropped and the
    file rewritten without it. A header other than ``header`` (another model's classes)
    raises an OutputError.
    """
    try:
        data = partial.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(
            f"cannot read {partial} to resume ({exc.strerror or exc}); check the file, or run "
            "without resume to start afresh"
        ) from exc
    end = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0  # what follows is torn
    if end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(end)
    rows = list(csv.reader(io.StringIO(data[:end].decode("utf-8", errors="replace"), newline="")))
    if not rows:
        return None
    if rows[0] == header and any(len(r) != len(header) for r in rows[1:]):
        rows = [r for r in rows if len(r) == len(header)]
        write_csv_rows(partial, rows)  # the rows as they were written, without the torn one
    if rows[0] != header:
        raise OutputError(
            f"{partial} has the columns {', '.join(rows[0])}, not this model's "
            f"({', '.join(header)}): it was written by another model; remove it or run "
            "without resume"
        )
    done: dict[str, set[int]] = {}
    failed: set[str] = set()
    status = header.index("status")
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        if row[status] == "error":
            failed.add(row[0])
        elif row[1].isdigit():
            done.setdefault(row[0], set()).add(int(row[1]))
    return done, failed, len(rows) - 1
