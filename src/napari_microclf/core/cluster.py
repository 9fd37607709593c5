"""Classification on a Dask cluster: connect to one, and the work each worker does.

:func:`connect` turns ``"local:N"`` (N single-threaded worker processes on this computer, a
``distributed.LocalCluster``), a scheduler address (``"tcp://HOST:PORT"``, e.g. one started by
dask-jobqueue on SLURM) or a ``distributed.Client`` into a client. Nothing here imports Dask,
TensorFlow or Qt at module import: a worker process that unpickles a task imports this module
and pays for TensorFlow once, when it first loads the bundle.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from .bundle import resolve_bundle_path
from .csv_format import csv_cell, resume_start
from .device import stderr_muted
from .errors import MicroclfError, one_line
from .images import TIFF_SUFFIXES, count_pages
from .predict_objects import IMAGE_ERRORS, predict_objects
from .predict_options import DEFAULTS, PredictOptions
from .predictor import Predictor
from .results import FileError

LOCAL_SPEC = re.compile(r"local:(\d+)")
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before saying it cannot be reached


class ClusterError(MicroclfError, ValueError):
    """A ``--cluster`` spec that is malformed, or a scheduler that cannot be reached."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def connect(spec, *, timeout: float | None = None):
    """A ``distributed.Client`` for ``spec``.

    Parameters
    ----------
    spec : str or distributed.Client
        ``"local:N"``: a new ``distributed.LocalCluster`` of ``N`` worker processes with one
        thread each on this computer (TensorFlow in each gets ``cores // N`` threads); it is
        closed with the client. A scheduler address (``"tcp://HOST:PORT"``, or any address
        ``distributed.Client`` accepts): an existing scheduler, e.g. one started by
        dask-jobqueue's ``SLURMCluster``. A ``Client``: returned as it is.
    timeout : float, optional
        Seconds to wait for a scheduler before giving up (default :data:`CONNECT_TIMEOUT`).

    Returns
    -------
    distributed.Client
        Close it when done (``client.close()``, or use :func:`connected`, which leaves a
        client passed in open); closing a ``local:N`` client also stops its workers.

    Raises
    ------
    ClusterError
        A malformed spec, ``N`` below 1, or a scheduler that cannot be reached within
        ``timeout`` (the message names the address and what to do).

    Examples
    --------
    >>> with connected("local:2") as client:  # doctest: +SKIP
    ...     result = predict_folder("model", "plates/", "plates.csv", client=client)
    """
    import logging

    from distributed import Client

    if isinstance(spec, Client):
        return spec
    kind, value = check_spec(spec)
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    if kind == "local":
        import dask

        threads = str(max(_cores() // value, 1))
        # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive
        # mmap threshold: every batch's arrays are mapped and unmapped afresh, and a worker
        # classifies at 0.6x the pace of this process. Its other settings stay.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            return Client(
                set_as_default=False,  # napari's lazy (dask) layers keep computing here
                n_workers=value,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # a free port: two clusters on one computer do not clash
                silence_logs=logging.ERROR,  # not the nanny's "still alive ... killing" at close
                env={
                    "TF_NUM_INTRAOP_THREADS": threads,
                    "TF_NUM_INTEROP_THREADS": "1",
                    "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                },
            )
    address = value
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        why = "" if reason.startswith("Timed out") else f" ({reason})"
        raise ClusterError(
            f"cannot reach a Dask scheduler at {address} within {timeout:g} s{why}; "
            "check that the scheduler is running and the address and port are right "
            "(`dask scheduler` or dask-jobqueue prints it), or use local:N for workers on "
            "this computer"
        ) from exc


def check_spec(spec) -> tuple[str, int | str]:
    """``("local", N)`` or ``("address", "tcp://HOST:PORT")`` for a cluster spec, without
    starting or reaching anything; a ClusterError says what a malformed one should be."""
    text = str(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not text:
        raise ClusterError(
            f"cluster {spec!r} is not a cluster: give local:N (N worker processes on this "
            "computer, e.g. local:4) or a Dask scheduler address such as tcp://HOST:8786"
        )
    if text.lower() == "local" or text.lower().startswith("local:"):
        match = LOCAL_SPEC.fullmatch(text.lower())
        n = int(match.group(1)) if match else 0
        if n < 1:
            raise ClusterError(
                f"cluster {text!r}: give local:N with N, the number of worker processes, "
                f"at least 1 (e.g. local:{max(_cores(), 1)}, one per core here)"
            )
        return "local", n
    address = text if "://" in text else f"tcp://{text}"
    if not re.fullmatch(
        r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[^\s/:\[\]]+)(:\d+)?/?", address, re.IGNORECASE
    ):
        raise ClusterError(
            f"cluster {text!r} is not local:N or a scheduler address; give local:N or an "
            "address such as tcp://HOST:8786 (printed by `dask scheduler` or "
            "cluster.scheduler_address)"
        )
    return "address", address


@contextlib.contextmanager
def connected(spec, *, timeout: float | None = None) -> Iterator:
    """:func:`connect` as a context manager: a client it opened is closed at the end (with its
    ``local:N`` workers); a ``Client`` passed in stays open."""
    from distributed import Client

    client = connect(spec, timeout=timeout)
    try:
        yield client
    finally:
        if not isinstance(spec, Client):
            client.close()


# -- on the workers -----------------------------------------------------------------------

# The Predictor of each bundle this worker process has loaded, by (folder, the bundle files'
# modification times): one load per worker, kept for every later task.
_PREDICTORS: dict = {}


def _bundle_key(path: str) -> tuple:
    folder = resolve_bundle_path(path)
    stamps = tuple(
        sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir())
    )
    return str(folder), stamps


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow in a worker with its start-up lines (CUDA probing, written from C++
    before any setting applies) kept off the terminal the workers share with the user, and
    its thread pools sized by ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` (set by
    ``local:N`` so that N workers share the cores instead of each taking all of them)."""
    import sys

    if "tensorflow" in sys.modules:
        return
    with stderr_muted():
        import tensorflow as tf

        intra = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
        inter = os.environ.get("TF_NUM_INTEROP_THREADS", "")
        if intra.isdigit():
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        if inter.isdigit():
            tf.config.threading.set_inter_op_parallelism_threads(int(inter))
        tf.config.list_logical_devices()


def prepare_worker() -> None:
    """Before a worker's first model: glibc's heap for batches and TensorFlow imported with
    its thread pools sized and its start-up lines muted (see the two helpers)."""
    _heap_for_batches()
    _import_tensorflow_quietly()


def _heap_for_batches() -> None:
    """Where Dask's nanny set ``MALLOC_TRIM_THRESHOLD_`` (its default, on every worker it
    starts, dask-jobqueue's included), glibc no longer adapts its mmap threshold, so each
    batch's arrays are mapped and unmapped afresh (1.5x slower tasks here). Allocations below
    32 MiB (a batch of 32 pages at 224 px is 19 MiB) come from the heap again, and up to
    64 MiB of free heap is kept; elsewhere (not glibc, or the variable unset) nothing
    changes."""
    import ctypes
    import ctypes.util

    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 64 * 2**20)


def worker_predictor(bundle: str | Path, options: PredictOptions = DEFAULTS) -> Predictor:
    """This process's :class:`~.predictor.Predictor` for ``bundle`` (a model folder or zip)
    with ``options``' batch size, engine and precision, loaded at the first call and kept
    while the bundle's files are unchanged. The engine ``"auto"`` is this worker's default
    (see :mod:`.engine`)."""
    key = (*_bundle_key(str(bundle)), int(options.batch_size), options.engine, options.precision)
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        prepare_worker()
        _PREDICTORS.clear()  # one model per worker: an older version is dropped
        predictor = _PREDICTORS[key] = Predictor(bundle, options=options)
    return predictor


# A task's pages: (the file as results name it, the path a worker reads, first page, the page
# after the last or None for the rest of the file)
Ref = tuple[str, str, int, "int | None"]


def classify_refs(bundle: str, refs: list, options: PredictOptions = DEFAULTS) -> list:
    """On a worker: the PagePrediction and FileError items of the pages ``refs`` name, in
    order, classified with this process's :func:`worker_predictor` (the same reading,
    preprocessing and batching as a single process) with ``options`` (sent with the task)."""
    predictor = worker_predictor(bundle, options)
    entries = (
        entry
        for name, path, start, stop in refs
        for entry in predictor._file_entries(Path(path), start, stop, name=name)
    )
    return [item for batch in predictor._classify(entries, tta=options.tta) for item in batch]


def classify_object_refs(
    bundle: str, refs: list, labels: dict[str, str], options: PredictOptions = DEFAULTS
) -> list:
    """On a worker: the ObjectPrediction items of the pages ``refs`` name (each image with
    its label file, ``labels[path]``), in order, or a FileError where an image or its labels
    cannot be used (the rest of that image is left out, as in one process)."""
    predictor = worker_predictor(bundle, options)
    out: list = []
    for name, path, start, stop in refs:
        try:
            end = count_pages(path) if stop is None else stop
            out += [
                replace(item, file=name)
                for item in predict_objects(
                    predictor, path, labels[path], pages=range(start, end), tta=options.tta
                )
            ]
        except IMAGE_ERRORS as exc:  # as classify_objects: that image, and the others go on
            out.append(FileError(name, one_line(exc, path), start))
    return out


def _page_counts(files: list[Path], threads: int = 8) -> Iterator[int | None]:
    """Each file's page count from its header, read a few files ahead in threads (a shared
    file system answers in parallel); None for a PNG/JPEG/BMP (one page, not read here) and
    for a file whose header cannot be read (its worker reports why)."""
    from concurrent.futures import ThreadPoolExecutor

    def count(path: Path) -> int | None:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return None
        try:
            return count_pages(path)
        except (MicroclfError, OSError, ValueError):
            return None

    with ThreadPoolExecutor(threads, thread_name_prefix="microclf-count") as pool:
        ahead: deque = deque()
        for path in files:
            ahead.append(pool.submit(count, path))
            if len(ahead) > 4 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def plan_tasks(
    files: list[Path],
    chunk_pages: int,
    done: dict[str, set[int]] | None = None,
    failed: set[str] | frozenset = frozenset(),
) -> Iterator[list[Ref]]:
    """``files`` as tasks of about ``chunk_pages`` pages each, in order: whole small files
    together, a TIFF stack cut into page ranges. ``done`` (pages written per file, keyed by
    the CSV's file cell) and ``failed`` (files with an error row) come from an interrupted
    run: their pages are left out."""
    chunk = max(int(chunk_pages), 1)
    done = done or {}
    task: list[Ref] = []
    size = 0
    for path, n in zip(files, _page_counts(files), strict=True):
        name = str(path)
        key = csv_cell(name)
        if key in failed:
            continue
        start = resume_start(done.get(key))
        read = os.path.abspath(path)
        if n is None:  # one page, or a file its worker will report
            task.append((name, read, start, None))
            size += 1
        else:
            while start < n:
                stop = min(start + chunk - size, n)
                task.append((name, read, start, None if stop == n else stop))
                size += stop - start
                start = stop
                if size >= chunk:
                    yield task
                    task, size = [], 0
        if size >= chunk:
            yield task
            task, size = [], 0
    if task:
        yield task


def _after_errors(batches: Iterator[list]) -> Iterator[list]:
    """Items as a single process gives them: once a file has an error, the pages of that file
    that other tasks classified later in the file are dropped (one process stops reading a
    file at its first bad page). Closing this closes ``batches``."""
    failed: set[str] = set()
    try:
        for batch in batches:
            out = []
            for item in batch:
                name = item.path if isinstance(item, FileError) else item.file
                if name in failed:
                    continue
                if isinstance(item, FileError):
                    failed.add(name)
                out.append(item)
            yield out
    finally:
        batches.close()  # cancels the cluster's outstanding tasks now


def classify_on_cluster(
    client,
    bundle,
    files: list[Path],
    *,
    options: PredictOptions = DEFAULTS,
    chunk_pages: int | None = None,
    done: dict[str, set[int]] | None = None,
    failed: set[str] | frozenset = frozenset(),
    should_stop=None,
    labels: dict[str, str | Path] | None = None,
) -> Iterator[list]:
    """The items of ``files`` classified on ``client``'s workers, one list per task, in input
    order (tasks that complete early wait in memory for those before them). ``labels``
    (``{image: its label file}``): each object of the images is classified instead
    (:func:`~.predict_objects.predict_objects` on the workers). ``options`` go
    to the workers with each task (batch size, TTA, engine and precision; the engine
    ``"auto"`` is each worker's default); ``chunk_pages``: pages per task (default: the batch
    size, one forward pass per task).

    At most two tasks per worker thread are submitted ahead (so a million pages never make a
    million futures), and at most :data:`MAX_WAITING` finished tasks wait for an earlier one.
    ``should_stop`` is checked after every finished task; when it is true, or when the
    generator is closed, the outstanding tasks are cancelled.
    """
    from distributed import KilledWorker, as_completed

    bundle = os.path.abspath(Path(bundle).expanduser())
    tasks = iter(plan_tasks(files, chunk_pages or options.batch_size, done, failed))
    token = uuid.uuid4().hex[:8]
    pending: dict = {}  # future -> task number
    finished: dict[int, list] = {}  # task number -> items, waiting for the tasks before it
    state = {"submitted": 0, "exhausted": False, "threads": 1, "asked": 0.0}
    running = as_completed(loop=client.loop)  # the client is not the default (connect)

    def window() -> int:
        now = time.monotonic()
        if now - state["asked"] > 2.0:  # workers come and go (dask-jobqueue's adapt)
            state["threads"] = max(sum(client.nthreads().values()), 1)
            state["asked"] = now
        return 2 * state["threads"] + 2

    def submit_more() -> None:
        while not state["exhausted"] and len(pending) < window() and len(finished) < MAX_WAITING:
            refs = next(tasks, None)
            if refs is None:
                state["exhausted"] = True
                return
            i = state["submitted"]
            key = f"microclf-{token}-{i}"
            if labels is None:
                future = client.submit(classify_refs, bundle, refs, options, key=key)
            else:
                pairs = {read: os.path.abspath(labels[name]) for name, read, *_ in refs}
                future = client.submit(classify_object_refs, bundle, refs, pairs, options, key=key)
            pending[future] = (i, refs)
            running.add(future)
            state["submitted"] += 1

    def generate():
        written = 0
        try:
            submit_more()
            for future in running:
                i, refs = pending.pop(future)
                try:
                    finished[i] = future.result()
                except KilledWorker as exc:
                    names = sorted({name for name, *_ in refs})
                    listed = ", ".join(names[:3]) + (
                        f" and {len(names) - 3} more" if len(names) > 3 else ""
                    )
                    raise ClusterError(
                        f"the pages of {listed} ended the worker classifying them "
                        "several times in a row (out of memory or a crash); give the workers "
                        "more memory, or leave those files out and run again with resume"
                    ) from exc
                future.release()
                while written in finished:
                    yield finished.pop(written)
                    written += 1
                if should_stop is not None and should_stop():
                    return
                submit_more()
        finally:
            if pending:
                client.cancel(list(pending))
            pending.clear()

    return _after_errors(generate())


MAX_WAITING = 1000  # finished tasks held for an earlier one before no more are submitted
