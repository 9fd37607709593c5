"""Folder runs: every page of every image under some paths into a CSV, past bad files.

:func:`predict_folder` (and :func:`iter_folder`, its generator for GUI workers) classifies
every page it can read, reports each file it cannot (unreadable, corrupt, too small, wrong
channels) as a :class:`~.results.FileError`, streams the rows to ``<csv>.partial`` as they
come (renamed to the CSV when the run is complete), resumes an interrupted run from that
file, and hands the pages to a Dask cluster when asked (:mod:`.cluster`). It says what
happened in one summary line (:meth:`~.results.FolderResult.summary`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path

from .bundle import Bundle, model_sha256, read_meta, resolve_bundle_path
from .cluster import classify_on_cluster, connected
from .csv_format import (
    check_csv_destination,
    csv_cell,
    csv_header,
    csv_row,
    read_partial,
    resume_start,
)
from .errors import OutputError
from .familiar import load_familiarity
from .files import atomic_write_text, refuse_destroying
from .images import find_images
from .predict_options import PredictOptions, options_of
from .predictor import Predictor
from .results import FileError, FolderResult, PagePrediction


def predict_folder(
    bundle,
    paths: str | Path | Sequence[str | Path],
    csv_path: str | Path | None = None,
    *,
    options: PredictOptions | None = None,
    threshold: float | None = None,
    batch_size: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_item: Callable[[PagePrediction | FileError], None] | None = None,
    tta: bool | None = None,
    client=None,
    resume: bool = False,
    chunk_pages: int | None = None,
    engine: str | None = None,
    precision: str | None = None,
) -> FolderResult:
    """Classify every page of every image under ``paths``, past files that cannot be read.

    Parameters
    ----------
    bundle : Predictor, Bundle, str or Path
        A loaded :class:`~.predictor.Predictor` (its batch size, engine and precision are
        used) or a model folder (loaded only after the checks below).
    paths : str, Path or sequence of them
        Folders (searched recursively; hidden files and folders skipped) and image files.
    csv_path : str or Path, optional
        Where to write the CSV (see :func:`~.csv_format.write_csv`; with ``status`` and
        ``error`` columns). Its folder is checked before the model is loaded
        (:func:`~.csv_format.check_csv_destination`).
        Rows are written to ``<csv_path>.partial`` as they come, flushed after each batch, and
        the file is renamed to ``csv_path`` when the run is complete: an earlier CSV of that
        name stays intact until then, and a stopped or failed run leaves its rows in the
        ``.partial`` file.
    options : PredictOptions, optional
        The settings (:class:`~.predict_options.PredictOptions`): ``threshold``,
        ``batch_size``, ``tta``, ``engine`` and ``precision``; the keywords of the same names
        override them.
    threshold : float
        Confidence below which the CSV's class reads ``"uncertain"`` (default 0: never).
    should_stop : callable, optional
        Checked after each batch; when true the run ends (``result.stopped``).
    on_item : callable, optional
        Called with each PagePrediction and FileError as it comes (progress, printing).
    tta : bool
        Test-time augmentation: each page's probabilities are the mean over the page and its
        three flips (one forward pass of four times the batch; about four times the compute).
        The unfamiliar score stays the unflipped page's. See
        :meth:`~.predictor.Predictor.predict_pages`.
    client : distributed.Client or str, optional
        Classify on a Dask cluster: a ``Client``, or a spec :func:`~napari_microclf.core.
        cluster.connect` accepts (``"local:N"``, ``"tcp://HOST:PORT"``; a cluster it starts
        is closed at the end). Files travel as ``(file, page range)`` references of about
        ``chunk_pages`` pages per task, never as pixels; each worker loads the bundle once
        (the model path must be readable there); results are written in input order as they
        complete, so the CSV is the one a single process writes, byte for byte. A worker that
        dies has its tasks run again by Dask (``distributed.scheduler.allowed-failures``).
    resume : bool
        Continue an interrupted run: the complete rows of ``<csv_path>.partial`` (from a
        single-process or a cluster run of the same model) are kept, a torn last line is
        dropped, and the pages and the failed files in it are not classified again. Needs
        ``csv_path``; without a ``.partial`` file the run starts afresh.
    chunk_pages : int, optional
        Pages per cluster task (default: ``batch_size``, one forward pass per task). TIFF
        stacks are split into page ranges (their page count is read from the header).
    engine, precision : str, optional
        The inference engine (``"auto"``, ``"openvino"``, ``"tensorflow"``) and precision
        (``"f32"``, or ``"bf16"`` on OpenVINO); see :mod:`.engine`. On a cluster, the
        workers'.

    Returns
    -------
    FolderResult
        The pages (a sequence of :class:`PagePrediction`), ``errors`` (one
        :class:`FileError` per file that could not be read, with its reason) and
        ``summary()``, one line saying what happened.

    Raises
    ------
    OutputError
        The CSV cannot be written there (before anything else is done); ``resume`` without
        ``csv_path``, or a ``.partial`` file written by a model with other classes.
    ImageReadError
        A path does not exist, or there is no image under ``paths``.
    ClusterError
        ``client`` is a spec that is malformed or names a scheduler that cannot be reached.

    Examples
    --------
    >>> result = predict_folder("model", "plates/", "plates.csv")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    Classified 118 pages from 38 of 40 files; 2 files could not be read (listed in the CSV's
    error column): a.tif: ...; b.png: .... CSV: plates.csv

    On a Dask cluster, continuing where an interrupted run stopped:

    >>> result = predict_folder(  # doctest: +SKIP
    ...     "model", "plates/", "plates.csv", client="tcp://10.0.0.5:8786", resume=True
    ... )
    """
    run = iter_folder(
        bundle,
        paths,
        csv_path,
        options=options_of(
            options,
            threshold=threshold,
            batch_size=batch_size,
            tta=tta,
            engine=engine,
            precision=precision,
        ),
        should_stop=should_stop,
        client=client,
        resume=resume,
        chunk_pages=chunk_pages,
    )
    try:
        while True:
            try:
                item = next(run)
            except StopIteration as end:
                return end.value
            if on_item is not None:
                on_item(item)
    finally:
        run.close()  # an error in on_item: the partial CSV is closed now, not when collected


def iter_folder(
    bundle,
    paths: str | Path | Sequence[str | Path],
    csv_path: str | Path | None = None,
    *,
    options: PredictOptions | None = None,
    threshold: float | None = None,
    batch_size: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool | None = None,
    client=None,
    resume: bool = False,
    chunk_pages: int | None = None,
    engine: str | None = None,
    precision: str | None = None,
) -> Generator[PagePrediction | FileError, None, FolderResult]:
    """:func:`predict_folder` as a generator (for a GUI worker): yields each PagePrediction
    and FileError as it comes and returns the :class:`FolderResult`.

    Each batch's rows are in the CSV (flushed) before its items are yielded. The checks run
    at the first ``next()``; closing the generator early keeps the ``.partial`` CSV (and
    cancels a cluster's outstanding tasks). ``options`` and the other arguments: see
    :func:`predict_folder`.
    """
    options = options_of(
        options,
        threshold=threshold,
        batch_size=batch_size,
        tta=tta,
        engine=engine,
        precision=precision,
    )
    csv_path = check_csv_destination(csv_path) if csv_path is not None else None
    if resume and csv_path is None:
        raise OutputError(
            "resume needs the CSV of the interrupted run: give its path (--csv PATH), the "
            "one whose PATH.partial holds the rows so far"
        )
    files = find_images(paths)
    if csv_path is not None:  # never over an image being classified, nor into the model
        model_folder = [bundle] if isinstance(bundle, (str, Path)) else []
        refuse_destroying(csv_path, inputs=files, protected=model_folder, what="CSV destination")
    with contextlib.ExitStack() as stack:
        if client is not None:
            client = stack.enter_context(connected(client))
        if client is not None and not isinstance(bundle, Predictor):
            predictor = None  # the workers load the model; here only its columns are needed
            class_names, unfamiliar, source = _bundle_columns(bundle)
        else:
            predictor = (
                bundle if isinstance(bundle, Predictor) else Predictor(bundle, options=options)
            )
            class_names = predictor.class_names
            unfamiliar = predictor.familiarity is not None
            source = predictor.bundle.source or predictor.bundle.path
        result = FolderResult(n_files=len(files))
        done: dict[str, set[int]] = {}
        failed: set[str] = set()
        out = None
        if csv_path:
            header = [
                csv_cell(v) for v in csv_header(class_names, status=True, unfamiliar=unfamiliar)
            ]
            partial = csv_path.with_name(csv_path.name + ".partial")
            identity = _run_identity(predictor.bundle.path if predictor else source, options)
            kept = None
            if resume and partial.exists():
                _check_identity(partial, identity)
                kept = read_partial(partial, header)
            if kept is not None:
                done, failed, result.resumed = kept
            out = _CsvStream(
                csv_path,
                class_names,
                options.threshold,
                unfamiliar,
                append=kept is not None,
                identity=identity,
            )
        finished = False
        batches = None
        try:
            if client is not None:
                batches = classify_on_cluster(
                    client,
                    source,
                    files,
                    options=options,
                    chunk_pages=chunk_pages,
                    done=done,
                    failed=failed,
                    should_stop=should_stop,
                )
            elif done or failed:
                batches = predictor._classify(
                    _remaining_entries(predictor, files, done, failed), should_stop, options.tta
                )
            else:
                batches = predictor.classify_paths(files, should_stop, tta=options.tta)
            for batch in batches:
                if done:  # a page the interrupted run wrote is never written twice
                    batch = [i for i in batch if not _written(i, done)]
                for item in batch:
                    (result.errors if isinstance(item, FileError) else result.predictions).append(
                        item
                    )
                if out is not None:
                    out.write(batch)
                yield from batch
            result.stopped = should_stop is not None and should_stop()
            finished = not result.stopped
        finally:
            if batches is not None:
                batches.close()  # before the client closes: a cluster's tasks are cancelled
            if out is not None:
                result.csv_path = out.close(keep=finished)
    return result


def _bundle_columns(bundle) -> tuple[list[str], bool, Path]:
    """Class names, whether pages get an unfamiliar score, and the bundle's path (a zip as
    the zip), read from its metadata without loading the model (or TensorFlow)."""
    if isinstance(bundle, Bundle):
        return (
            bundle.class_names,
            load_familiarity(bundle.path, bundle.meta) is not None,
            (bundle.source or bundle.path),
        )
    source = Path(bundle).expanduser()
    meta = read_meta(source)
    folder = resolve_bundle_path(source)
    folder = folder.parent if folder.is_file() else folder
    return list(meta["class_names"]), load_familiarity(folder, meta) is not None, source


IDENTITY_SUFFIX = ".json"  # <csv>.partial.json: which model and settings wrote the rows


def _run_identity(bundle_path: str | Path, options: PredictOptions) -> dict:
    """What makes a run's rows what they are: the SHA-256 of the model's ``model.keras`` and
    the settings that change a row (threshold, test-time augmentation, precision). The
    engine is left out: OpenVINO and TensorFlow agree within 1e-4 at fp32."""
    folder = resolve_bundle_path(Path(bundle_path).expanduser())
    folder = folder.parent if folder.is_file() else folder
    return {
        "model_sha256": model_sha256(folder),
        "threshold": float(options.threshold),
        "tta": bool(options.tta),
        "precision": str(options.precision),
    }


def _said(key: str, value) -> str:
    if key == "model_sha256":
        return f"model.keras SHA-256 {str(value)[:12]}..."
    return f"{key} {value}"


def _check_identity(partial: Path, identity: dict) -> None:
    """Refuse (OutputError) to resume ``partial`` unless the same model and settings wrote it
    (recorded in ``<partial>.json``): its rows and this run's must never be mixed."""
    side = partial.with_name(partial.name + IDENTITY_SUFFIX)
    try:
        recorded = json.loads(side.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == identity:
        return
    todo = "remove it (and its .json) or run without resume to start afresh"
    if not isinstance(recorded, dict):
        raise OutputError(
            f"{partial} does not say which model and settings wrote it ({side.name} is missing "
            f"or unreadable), so its rows cannot be continued safely; {todo}"
        )
    differ = [k for k in identity if recorded.get(k) != identity[k]]
    raise OutputError(
        f"{partial} was written by another model or settings ("
        + ", ".join(f"{_said(k, recorded.get(k))}, now {_said(k, identity[k])}" for k in differ)
        + f"); its rows and this run's would be mixed: {todo}"
    )


def _written(item: PagePrediction | FileError, done: dict[str, set[int]]) -> bool:
    if isinstance(item, FileError):
        return False
    return item.page in done.get(csv_cell(item.file or ""), ())


def _remaining_entries(predictor, files, done, failed):
    """:meth:`Predictor._file_entries` of the pages an interrupted run did not write."""
    for path in files:
        key = csv_cell(str(path))
        if key in failed:
            continue
        yield from predictor._file_entries(path, resume_start(done.get(key)))


class _CsvStream:
    """Rows written to ``<path>.partial`` as they come; renamed to ``path`` on completion."""

    def __init__(
        self,
        path: Path,
        class_names: Sequence[str],
        threshold: float,
        unfamiliar: bool = False,
        append: bool = False,
        identity: dict | None = None,
    ):
        """``append``: add to an existing ``.partial`` file (its header written already).
        ``identity``: the model and settings, recorded beside it (:func:`_check_identity`)."""
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.identity_file = self.partial.with_name(self.partial.name + IDENTITY_SUFFIX)
        if not append and identity is not None:
            try:
                atomic_write_text(self.identity_file, json.dumps(identity))
            except OSError as exc:
                raise OutputError(
                    f"cannot write {self.identity_file} ({exc.strerror or exc}); choose "
                    "another CSV path"
                ) from exc
        self.class_names = list(class_names)
        self.threshold = threshold
        self.unfamiliar = unfamiliar  # the model scores familiarity: the `unfamiliar` column
        try:
            self.file = open(  # noqa: SIM115
                self.partial, "a" if append else "w", encoding="utf-8", newline=""
            )
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.partial} ({exc.strerror or exc}); choose another CSV path"
            ) from exc
        self.writer = csv.writer(self.file)
        if append:
            return
        self.writer.writerow(
            [
                csv_cell(v)
                for v in csv_header(self.class_names, status=True, unfamiliar=self.unfamiliar)
            ]
        )

    def write(self, items: Iterable[PagePrediction | FileError]) -> None:
        """Write the rows of ``items`` and flush them to disk."""
        for item in items:
            row = csv_row(
                item, self.class_names, self.threshold, status=True, unfamiliar=self.unfamiliar
            )
            self.writer.writerow([csv_cell(v) for v in row])
        self.file.flush()

    def close(self, keep: bool) -> Path:
        """Close; ``keep`` (a complete run) renames the partial file to the CSV's name."""
        self.file.close()
        if keep:
            os.replace(self.partial, self.path)
            with contextlib.suppress(FileNotFoundError):
                self.identity_file.unlink()
            return self.path
        return self.partial
