"""What prediction gives back: a :class:`PagePrediction` per classified page, a
:class:`FileError` per file (or rest of a stack) that could not be read, and a
:class:`FolderResult` for a whole folder run.

Plain records with no behaviour beyond describing themselves: the predictor
(:mod:`.predictor`) makes them, the CSV format (:mod:`.csv_format`) writes them and folder
runs (:mod:`.folder_runs`) collect them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .predict_options import DEFAULTS


@dataclass(frozen=True)
class PagePrediction:
    file: str | None
    page: int
    class_name: str
    confidence: float
    probabilities: dict[str, float]
    # the page's feature distance from the training data over the bundle's threshold (see
    # core/familiar.py): above 1 the page is unlike the training images. None: the bundle
    # has no familiarity description (trained before it existed).
    unfamiliar_score: float | None = None
    # the probabilities are the mean over the page's four flipped views (test-time
    # augmentation); the unfamiliar score is still the unflipped page's
    tta: bool = False

    @property
    def unfamiliar(self) -> bool:
        """The page lies beyond the training data (its class means little, whatever the
        confidence)."""
        return self.unfamiliar_score is not None and self.unfamiliar_score > 1.0

    def label(self, threshold: float = DEFAULTS.threshold) -> str:
        """The class; ``"unfamiliar"`` for a page unlike the training images, else
        ``"uncertain"`` below ``threshold`` (see :class:`~.predict_options.PredictOptions`)."""
        if self.unfamiliar:
            return "unfamiliar"
        return self.class_name if self.confidence >= threshold else "uncertain"


@dataclass(frozen=True)
class ObjectPrediction(PagePrediction):
    """A :class:`PagePrediction` of one object: the crop around label ``object_label`` of
    ``page`` (see :mod:`.objects`), with where it is (``centroid`` ``(y, x)``, ``bbox``
    ``(y0, x0, y1, x1)``), its ``area`` in pixels and whether it touches the page's border."""

    object_label: int = 0
    centroid: tuple[float, float] = (float("nan"), float("nan"))
    area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    touches_border: bool = False


@dataclass(frozen=True)
class FileError:
    """A file (or the rest of a file, from ``page`` on) that could not be classified.

    ``message`` is one line saying what is wrong, without the path; ``str()`` adds the path.
    """

    path: str
    message: str
    page: int | None = None  # the page that failed; None: the file could not be opened

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class FolderResult(Sequence):
    """What :func:`~napari_microclf.core.folder_runs.predict_folder` did: the classified
    pages, in order, and the files it could not read.

    It is a sequence of :class:`PagePrediction` (``len``, indexing and iteration give the
    pages), so code written for a plain list of pages keeps working.
    """

    predictions: list[PagePrediction] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    n_files: int = 0  # files looked at (classified, failed, or both for a half-read stack)
    stopped: bool = False  # should_stop() ended the run early
    csv_path: Path | None = None  # the CSV written (the .partial file if the run was stopped)
    resumed: int = 0  # rows kept from an interrupted run's .partial CSV (resume=True)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i):
        return self.predictions[i]

    def __iter__(self) -> Iterator[PagePrediction]:
        return iter(self.predictions)

    @property
    def ok(self) -> bool:
        """At least one page was classified."""
        return bool(self.predictions)

    def summary(self, max_listed: int = 3) -> str:
        """One line: pages and files classified, files that failed (the first few with their
        reason), and where the CSV is."""
        pages = len(self.predictions)
        files = len({p.file for p in self.predictions})
        if pages:
            text = (
                f"Classified {_plural(pages, 'page')} from "
                f"{files if files == self.n_files else f'{files} of {self.n_files}'} "
                f"file{'s' if self.n_files != 1 else ''}"
            )
        else:
            text = f"No page could be classified ({_plural(self.n_files, 'file')} tried)"
        if self.resumed:
            text += (
                f" after {_plural(self.resumed, 'row')} kept from the interrupted run"
                if pages
                else f"; {_plural(self.resumed, 'row')} kept from the interrupted run"
            )
        if self.stopped:
            text += " before the run was stopped"
        if self.errors:
            read = {p.file for p in self.predictions}
            in_part = sum(e.path in read for e in self.errors)
            notes = [f"{in_part} only in part"] if in_part else []
            if self.csv_path is not None:
                notes.append("listed in the CSV's error column")
            listed = "; ".join(
                f"{Path(e.path).name}: {e.message.rstrip('.')}" for e in self.errors[:max_listed]
            )
            more = len(self.errors) - max_listed
            text += (
                f"; {_plural(len(self.errors), 'file')} could not be read"
                + (f" ({'; '.join(notes)})" if notes else "")
                + f": {listed}"
                + (f"; and {more} more" if more > 0 else "")
            )
        if self.csv_path is not None:
            text += f". CSV: {self.csv_path}"
        return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
