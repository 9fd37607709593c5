"""A dataset's backbone features computed ahead of training, here or on a Dask cluster.

:func:`compute_features` fills the dataset's feature cache (:mod:`.features`) with exactly
what ``train`` with the same settings reads: every training page with its augmented views,
every validation and test page plain, under the same key. A following training then reports
``0 image(s) computed`` and trains only the head, in seconds: the path for 100,000+ images,
where the frozen backbone is the whole cost (``microclf features DATA --cluster ...``, then
``microclf train DATA ...`` on one computer).

The dataset's files are cut into tasks of up to :data:`TASK_PAGES` pages (a file is never
split: its cache entry is written by one task), the same tasks whoever runs them. A task
carries file names, never pixels; each worker process builds the backbone once and keeps it
for every later task with the same settings, reads its files, computes their features with
:func:`~napari_microclf.core.features.extract_features` and writes the per-file ``.npy``
entries straight into the cache folder (atomically), then returns a few counts. **The
workers therefore need the dataset at the same path as this computer** (a shared file
system), and the same TensorFlow, Keras and weights (checked; a mismatch stops the run with
one line). A file that cannot be read is reported with its reason and the rest go on; a
worker that dies has its tasks rerun elsewhere by Dask (the scheduler's ``allowed-failures``,
3 by default).

Augmented views: each task restarts the augmentation's random generator from a seed made of
the settings' seed and its files' contents, so a run gives the same views wherever and
whenever its tasks run, on any number of workers or in this process. They are other draws
(of the same distribution) than those a training computing its own features makes in one
process, whose draws follow its batch order; view 0, the plain page, is the same numbers
either way (within 1e-5).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import prepare_worker
from .dataset import check_dataset
from .engine import EngineError, engine_label, resolve_engine
from .errors import MicroclfError, OutputError, WeightsError
from .features import (
    FEATURES_VERSION,
    FeatureCache,
    FeatureExtractor,
    _folder_bytes,
    cache_key,
    extract_features,
    key_fields,
    prune_cache,
)
from .files import file_digest
from .images import PageRef, PreprocessSpec
from .model import build_classifier, parse_fine_tune, resolve_weights, weights_identity
from .preflight import check_dataset_writable, scan_images, user_message
from .train import Message, Progress, has_head_phase, reads_cached_features, samples_of

TASK_PAGES = 64  # pages per task at most: a few seconds of backbone work at 224 px
MIN_TASKS = 16  # a small set is still cut into this many tasks (of 8 pages at least)
IN_FLIGHT_PER_THREAD = 2  # tasks queued per worker thread: none idles, few wait on a dead one


@dataclass
class FeaturesSummary:
    """What :func:`compute_features` did."""

    folder: Path  # the cache's key folder
    key: str
    files: int  # files of the subsets a training reads features of
    pages: int
    views: int  # views per training page (1 + augmented views)
    computed: int = 0  # pages run through the backbone now
    reused: int = 0  # pages whose features were in the cache already
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0
    workers: int | None = None  # Dask workers at the start; None: this process
    stopped: bool = False
    bytes: int = 0  # the key folder's size afterwards

    @property
    def rate(self) -> float:
        """Pages per second (computed and reused)."""
        return (self.computed + self.reused) / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        where = "this process" if self.workers is None else f"{self.workers} Dask worker(s)"
        s = (
            f"Features of {self.pages} page(s) in {self.files} file(s) ({self.views} view(s) per "
            f"training page) on {where}: {self.computed} computed, {self.reused} reused, "
            f"{len(self.failed)} file(s) failed, in {self.seconds:.1f}s "
            f"({self.rate:.1f} pages/s); cache {self.folder} ({self.bytes / 2**20:.1f} MB)"
        )
        if self.stopped:
            s += "; stopped before the end (what was done is kept)"
        return s


def check_features(config) -> list[str]:
    """Before TensorFlow: the dataset, that its cache can be written, every image's header
    (the training's own checks, :mod:`.preflight`). Returns lines worth saying."""
    root = Path(config.data_dir).expanduser()
    check_dataset(root)
    if check_dataset_writable(root, config.resplit, config.group_by) is not None:
        raise OutputError(
            f"dataset {root} is read-only: the feature cache is kept in it "
            f"({root / '.microclf-cache'}); make it writable, or copy the dataset to a "
            "writable folder and compute the features there"
        )
    scan = scan_images(root, config.channel_map)
    error = scan.error(root)
    if error is not None:
        raise error
    return [*scan.warnings, f"Checked {scan.files} image file(s) ({scan.pages} page(s))"]


def compute_features(
    config,
    client=None,
    on_update: Callable[[object], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    check: bool = True,
) -> FeaturesSummary:
    """Compute the frozen backbone's features of ``config``'s dataset into its feature cache.

    Parameters
    ----------
    config : TrainConfig
        The training's settings: those that change features (backbone, weights, image size,
        preprocessing, seed, augmentation, views, the split) must be the ones the training
        will use, or it will not find them.
    client : distributed.Client, optional
        Run the tasks on this Dask cluster (see :func:`~.cluster.connect`); its workers must
        see the dataset at the same path. None: in this process, the same tasks one by one.
    on_update : callable, optional
        Called with :class:`~.train.Message` and :class:`~.train.Progress` (pages, pages/s).
    should_stop : callable, optional
        Polled after every task; True stops (what finished is kept in the cache).
    check : bool
        Run :func:`check_features` first (the command line has run it before TensorFlow).

    Returns
    -------
    FeaturesSummary
        Counts, failed files with their reasons, time and the cache folder.

    Raises
    ------
    MicroclfError
        Settings under which a training reads no cached features (``cache=False``,
        fine-tuning without a head phase, no pretrained weights with ``weights="auto"``), a
        problem of the dataset, or a worker that cannot do the work (it does not see the
        dataset, has other TensorFlow/Keras versions or other weights).
    """

    def emit(update):
        if on_update is not None:
            on_update(update)

    t0 = time.perf_counter()
    for line in check_features(config) if check else ():
        emit(Message(line))
    settings, tasks, summary = _plan(config, emit)
    workers = None
    if client is not None:
        workers = len(client.scheduler_info().get("workers", {}))
        address = client.scheduler_info().get("address", "?")
        emit(Message(f"Dask cluster: {workers} worker(s) at {address}"))
    summary.workers = workers
    total = sum(len(pages) for t in tasks for _, pages, _ in t)
    state = {"done": 0}

    def record(task, status):
        if status.get("fatal"):
            raise MicroclfError(status["fatal"])
        summary.computed += status["computed"]
        summary.reused += status["reused"]
        for path, reason in status["failed"]:
            summary.failed.append((path, reason))
            emit(Message(f"{path}: {reason}", "warning"))
        state["done"] += sum(len(pages) for _, pages, _ in task)
        seconds = time.perf_counter() - t0
        rate = state["done"] / seconds if seconds > 0 else None
        emit(
            Progress(
                "features",
                state["done"],
                total,
                rate,
                (total - state["done"]) / rate if rate else None,
            )
        )

    run = _run_here if client is None else _run_on_cluster
    summary.stopped = run(client, settings, tasks, record, should_stop)
    FeatureCache(settings["data_dir"], settings["key"], settings["fields"]).touch()
    summary.seconds = time.perf_counter() - t0
    summary.bytes = _folder_bytes(summary.folder) if summary.folder.is_dir() else 0
    return summary


def _plan(config, emit) -> tuple[dict, list, FeaturesSummary]:
    """The settings a worker needs and the tasks: what ``train`` would read, file by file."""
    resolved = resolve_weights(config.backbone, config.weights)
    if resolved.note:
        emit(Message(resolved.note, resolved.level))
    backbone, weights = resolved.backbone, resolved.weights
    if weights is None and str(config.weights).lower() == "auto":
        raise WeightsError(
            "no pretrained weights could be had, so a training would train the whole network "
            "from scratch on the images, with no cached features to compute; get ImageNet "
            "weights (--weights imagenet with a network, or a .h5 file) or train directly"
        )
    fine_tune = parse_fine_tune(config.fine_tune)
    # as train(): a frozen base, or fine-tuning whose first phase trains the head
    two_phase = has_head_phase(config, fine_tune, weights)
    if not reads_cached_features(config, fine_tune, weights):
        raise MicroclfError(
            "with these settings a training reads the images themselves, not cached features "
            "(--no-cache, or fine-tuning without a frozen first phase): there is nothing to "
            "compute; drop --no-cache, or train directly"
        )
    samples = samples_of(config)
    spec = config.preprocessing
    views = 1 + (config.views if config.augment else 0)
    strength = config.augment_strength if config.augment else None
    weights_id = weights_identity(backbone, weights, config.seed)
    engine = resolve_engine(config.engine)  # the workers use it too: the same cache key
    key = cache_key(spec, weights_id, config.seed, strength, engine)
    fields = key_fields(spec, weights_id, config.seed, strength, engine)
    data_dir = str(Path(config.data_dir).expanduser().resolve())
    cache = FeatureCache(data_dir, key, fields)
    cache.touch()
    if cache.unwritable:
        raise OutputError(
            f"cannot write the feature cache in {cache.folder} ({cache.unwritable}); make the "
            "dataset writable"
        )
    if removed := prune_cache(data_dir, keep=key):
        emit(Message(f"Feature cache: removed {len(removed)} folder(s) unused for 30 days."))
    subsets = ("train", "val") if two_phase else ("train", "val", "test")
    files: dict[str, list] = {}  # path -> [pages, views], in the subsets' order
    for subset in subsets:
        for ref in getattr(samples, subset):
            entry = files.setdefault(str(Path(ref.path).resolve()), [[], 1])
            entry[0].append(int(ref.page))
            entry[1] = max(entry[1], views if subset == "train" else 1)
    n_pages = sum(len(p) for p, _ in files.values())
    task_pages = min(TASK_PAGES, max(8, -(-n_pages // MIN_TASKS)))  # not by the workers: the
    tasks, current, size = [], [], 0  # same tasks (and views) on any cluster
    for path, (pages, n_views) in files.items():
        if current and size + len(pages) > task_pages:
            tasks.append(current)
            current, size = [], 0
        current.append((path, tuple(pages), n_views))
        size += len(pages)
    if current:
        tasks.append(current)
    settings = {
        "data_dir": data_dir,
        "key": key,
        "fields": fields,
        "weights_id": weights_id,
        "spec": spec.to_dict(),
        "backbone": backbone,
        "weights": weights,
        "n_classes": len(samples.class_names),
        "image_size": config.image_size,
        "dropout": config.dropout,
        "augment": config.augment,
        "augment_strength": config.augment_strength,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "engine": engine,
    }
    summary = FeaturesSummary(cache.folder, key, len(files), n_pages, views)
    emit(
        Message(
            f"Features for {summary.pages} page(s) in {summary.files} file(s) "
            f"({', '.join(subsets)}; {views} view(s) per training page) into {cache.folder}, "
            f"{len(tasks)} task(s)"
        )
    )
    return settings, tasks, summary


def _run_here(client, settings, tasks, record, should_stop) -> bool:
    """The tasks one by one in this process; True if stopped."""
    try:
        for task in tasks:
            record(task, features_task(settings, task))
            if should_stop is not None and should_stop():
                return True
    finally:
        _EXTRACTORS.clear()  # this process (napari, a notebook) does not keep the backbone
    return False


def _run_on_cluster(client, settings, tasks, record, should_stop) -> bool:
    """The tasks on the cluster, a bounded number in flight; True if stopped."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    threads = sum(client.nthreads().values()) or 1
    window = max(IN_FLIGHT_PER_THREAD * threads, 2)
    pending = iter(tasks)
    of: dict = {}

    def submit():
        task = next(pending, None)
        if task is None:
            return None
        future = client.submit(features_task, settings, task, pure=False)
        of[future] = task
        return future

    first = [f for f in (submit() for _ in range(window)) if f is not None]
    running = as_completed(first, loop=client.loop)  # the client is not the default
    try:
        for future in running:
            task = of.pop(future)
            try:
                status = future.result()
            except KilledWorker as exc:  # died on every worker it was given to
                reason = (
                    f"every worker given it died ({type(exc).__name__}; out of memory?); "
                    "run again to retry it"
                )
                status = {"computed": 0, "reused": 0, "failed": [(p, reason) for p, *_ in task]}
            record(task, status)
            if should_stop is not None and should_stop():
                return True
            following = submit()
            if following is not None:
                running.add(following)
    finally:
        if of:
            client.cancel(list(of))
    return False


# -- on the workers -----------------------------------------------------------------------

# The FeatureExtractor of this worker process, by its settings: built at the first task and
# kept for every later one (one at a time; a task with other settings replaces it).
_EXTRACTORS: dict = {}
_LOCK = threading.Lock()  # a worker with several threads runs one task at a time
_FILE_ERRORS = (MicroclfError, OSError, ValueError)  # a file that cannot be read or decoded


def _host() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


def _worker_problem(settings: dict) -> str | None:
    """Why this worker cannot compute the features ``train`` on the client would read."""
    import keras
    import tensorflow as tf

    fields, host = settings["fields"], _host()
    if not Path(settings["data_dir"]).is_dir():
        return (
            f"the Dask worker on {host} does not see the dataset {settings['data_dir']}: the "
            "workers read the images and write the feature cache there, so they need the "
            "same file system at the same path"
        )
    try:
        engine = engine_label(resolve_engine(settings["engine"]))
    except EngineError as exc:
        return f"the Dask worker on {host}: {exc}"
    mine = {"features_version": FEATURES_VERSION, "tensorflow": tf.__version__}
    mine["keras"] = keras.__version__
    mine["engine"] = engine
    for name, version in mine.items():
        if fields.get(name) != version:
            return (
                f"the Dask worker on {host} has {name} {version}, this computer "
                f"{fields.get(name)}: its features would not be the ones a training here "
                "reads; install the same microclf, TensorFlow, Keras and OpenVINO on the "
                "workers"
            )
    try:
        got = weights_identity(settings["backbone"], settings["weights"], settings["seed"])
    except OSError as exc:
        return (
            f"the Dask worker on {host} cannot read the weights file {settings['weights']} "
            f"({exc.strerror or exc}); put it on the file system the workers share"
        )
    if got != settings["weights_id"]:
        return (
            f"the Dask worker on {host} has other starting weights ({got}) than this computer "
            f"({settings['weights_id']}); give the workers the same weights file (e.g. "
            "--weights FILE on the shared file system)"
        )
    return None


def _worker_extractor(settings: dict):
    """This process's extractor for ``settings``, built once (the random state kept)."""
    import random

    import numpy as np

    key = json.dumps({k: v for k, v in settings.items() if k not in ("fields",)}, sort_keys=True)
    extractor = _EXTRACTORS.get(key)
    if extractor is None:
        prepare_worker()
        _EXTRACTORS.clear()
        problem = _worker_problem(settings)
        if problem is not None:
            raise _Fatal(problem)
        state = random.getstate(), np.random.get_state()
        try:  # as train() builds it: the same random base for weights=None
            model = build_classifier(
                settings["n_classes"],
                settings["image_size"],
                settings["weights"],
                settings["dropout"],
                settings["augment"],
                settings["augment_strength"],
                0,
                settings["seed"],
                settings["backbone"],
                warn=False,
            )
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
        extractor = _EXTRACTORS[key] = FeatureExtractor(
            model,
            settings["seed"],
            settings["augment_strength"],
            settings["batch_size"],
            engine=settings["engine"],
            weights_id=settings["weights_id"],
        )
    return extractor


class _Fatal(Exception):
    """A worker that cannot do any task (said once, stops the run)."""


def _task_seed(seed: int, views: int, paths) -> int:
    text = json.dumps([seed, views, [file_digest(p) for p in paths]])
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def _reason(exc: BaseException, path: str) -> str:
    text = user_message(exc) or f"{type(exc).__name__}: {exc}"
    return text.removeprefix(f"{path}: ").strip()


def features_task(settings: dict, task: list[tuple[str, tuple[int, ...], int]]) -> dict:
    """One task, on a worker (or here): the features of ``task``'s ``(file, pages, views)``
    into the cache. Returns ``{"computed", "reused", "failed": [(file, reason)], "fatal"}``
    (small: the features themselves go to the cache folder)."""
    status: dict = {"computed": 0, "reused": 0, "failed": [], "fatal": None}
    with _LOCK:
        try:
            extractor = _worker_extractor(settings)
        except _Fatal as exc:
            status["fatal"] = str(exc)
            return status
        cache = FeatureCache(settings["data_dir"], settings["key"], settings["fields"])
        spec = PreprocessSpec.from_dict(settings["spec"])

        def run(group, views):
            hits = cache.hits
            try:
                extractor.reseed(_task_seed(settings["seed"], views, [p for p, _ in group]))
                refs = [PageRef(Path(p), page) for p, pages in group for page in pages]
                extract_features(refs, views, spec, extractor, cache, memmap=False)
            except _FILE_ERRORS as exc:
                cache.hits = hits  # counted again below
                if len(group) == 1:
                    status["failed"].append((group[0][0], _reason(exc, group[0][0])))
                    return
                for one in group:  # which file it was: the others are computed alone
                    run([one], views)

        for views in sorted({v for *_, v in task}):
            run([(p, pages) for p, pages, v in task if v == views], views)
        if cache.unwritable:
            status["fatal"] = (
                f"the Dask worker on {_host()} cannot write the feature cache in "
                f"{cache.folder} ({cache.unwritable}); the workers need write access to the "
                "dataset"
            )
    status["computed"], status["reused"] = cache.computed, cache.hits
    return status
