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
from collections.abc import Iterator
from pathlib import Path

from .errors import MicroclfError

LOCAL_SPEC = re.compile(r"local:(\d+)")
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before saying it cannot be reached


class ClusterError(MicroclfError, ValueError):
    """A ``--cluster`` spec that is malformed, or a scheduler that cannot be reached."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def connect(spec, *, timeout: float = CONNECT_TIMEOUT):
    """A ``distributed.Client`` for ``spec``.

    Parameters
    ----------
    spec : str or distributed.Client
        ``"local:N"``: a new ``distributed.LocalCluster`` of ``N`` worker processes with one
        thread each on this computer (TensorFlow in each gets ``cores // N`` threads); it is
        closed with the client. A scheduler address (``"tcp://HOST:PORT"``, or any address
        ``distributed.Client`` accepts): an existing scheduler, e.g. one started by
        dask-jobqueue's ``SLURMCluster``. A ``Client``: returned as it is.
    timeout : float
        Seconds to wait for a scheduler before giving up.

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
    from distributed import Client

    if isinstance(spec, Client):
        return spec
    text = str(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not text:
        raise ClusterError(
            f"cluster {spec!r} is not a cluster: give local:N (N worker processes on this "
            "computer, e.g. local:4) or a Dask scheduler address such as tcp://HOST:8786"
        )
    if text.lower().startswith("local"):
        match = LOCAL_SPEC.fullmatch(text.lower())
        n = int(match.group(1)) if match else 0
        if n < 1:
            raise ClusterError(
                f"cluster {text!r}: give local:N with N, the number of worker processes, "
                f"at least 1 (e.g. local:{max(_cores(), 1)}, one per core here)"
            )
        threads = str(max(_cores() // n, 1))
        return Client(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={
                "TF_NUM_INTRAOP_THREADS": threads,
                "TF_NUM_INTEROP_THREADS": "1",
                "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            },
        )
    address = text if "://" in text else f"tcp://{text}"
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", address, re.IGNORECASE):
        raise ClusterError(
            f"cluster {text!r} is not local:N or a scheduler address; give local:N or an "
            "address such as tcp://HOST:8786 (printed by `dask scheduler` or "
            "cluster.scheduler_address)"
        )
    try:
        return Client(address, timeout=timeout)
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


@contextlib.contextmanager
def connected(spec, *, timeout: float = CONNECT_TIMEOUT) -> Iterator:
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
    from .model import resolve_bundle_path

    folder = resolve_bundle_path(path)
    stamps = tuple(
        sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir())
    )
    return str(folder), stamps


def worker_predictor(bundle: str | Path, batch_size: int = 32):
    """This process's :class:`~napari_microclf.core.predict.Predictor` for ``bundle`` (a
    model folder or zip), loaded at the first call and kept while the bundle's files are
    unchanged."""
    from .predict import Predictor

    key = (*_bundle_key(str(bundle)), int(batch_size))
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        _PREDICTORS.clear()  # one model per worker: an older version is dropped
        predictor = _PREDICTORS[key] = Predictor(bundle, batch_size)
    return predictor
