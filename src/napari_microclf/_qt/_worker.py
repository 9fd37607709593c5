"""Run a callback-style core function (``fn(..., on_update, should_stop)``) as a generator.

``updates(fn, ...)`` starts ``fn`` in a plain thread, gives it ``on_update`` (puts on a
queue) and ``should_stop`` (reads a threading.Event), and yields what arrives, so that a
napari ``thread_worker`` generator can relay it to the main thread. Batch updates are
throttled: a burst of queued ``BatchEnd`` keeps only the newest, and at most one every
``min_interval`` seconds (the last batch of an epoch always passes). Closing the generator
(``worker.quit()``) sets the stop event and waits for the thread. The function's return
value is the generator's return value; its exception is raised in the generator.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Generator

from ..core.errors import MicroclfError

_DONE = object()


class WorkerError(Exception):
    """A RuntimeError from a worker generator, raised again under another type.

    superqt's generator workers take any RuntimeError for the sign of a deleted worker: they
    drop it with a warning and never emit ``errored`` or ``finished``, which would leave a
    widget's buttons disabled for good. The original is the ``__cause__`` (its traceback is
    shown)."""


def surfaced(gen_fn: Callable) -> Callable:
    """Wrap a worker generator function so that its RuntimeErrors reach ``errored``.

    Ours (a MicroclfError such as a LockedError) stay MicroclfErrors with the same message."""

    @functools.wraps(gen_fn)
    def wrapper(*args, **kwargs):
        try:
            return (yield from gen_fn(*args, **kwargs))
        except RuntimeError as exc:
            if isinstance(exc, MicroclfError):
                raise MicroclfError(str(exc)) from exc
            raise WorkerError(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def stoppable_progress(total: int, desc: str, on_cancel: Callable[[], None], nest_under=None):
    """napari's cancelable progress bar (shown in the activity dock, with its Cancel button)
    that calls ``on_cancel`` as soon as the user cancels there.

    napari calls ``cancel_callback`` only for a bar that is iterated; ours are updated by
    hand from a worker's results, so ``cancel`` itself calls ``on_cancel``: the widget's own
    Stop, so that Cancel in the dock and the widget's Stop button do the same. ``nest_under``
    shows the bar under another one (Train does not nest: closing nested bars crashes napari
    0.9.2's activity dialog, see ``TrainWidget._batch_pbar``).
    """
    from napari.utils.progress import cancelable_progress

    class _Stoppable(cancelable_progress):
        def cancel(self) -> None:
            super().cancel()
            on_cancel()

    return _Stoppable(total=total, desc=desc, nest_under=nest_under)


def updates(
    fn: Callable, *args, stop: threading.Event | None = None, min_interval: float = 0.1, **kwargs
) -> Generator[object, None, object]:
    from ..core.train import BatchEnd

    q: queue.Queue = queue.Queue()
    stop = stop or threading.Event()
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, on_update=q.put, should_stop=stop.is_set, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the generator below
            box["error"] = exc
        finally:
            q.put(_DONE)

    thread = threading.Thread(target=target, name=f"microclf-{fn.__name__}", daemon=True)
    thread.start()
    last_batch = 0.0
    try:
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                yield None  # lets worker.quit() take effect while the core is busy
                continue
            if item is _DONE:
                break
            if isinstance(item, BatchEnd):
                # only the newest of a burst, and not more often than min_interval
                newer = q.queue and isinstance(q.queue[0], BatchEnd)
                now = time.perf_counter()
                if newer or (item.batch < item.steps and now - last_batch < min_interval):
                    continue
                last_batch = now
            yield item
    finally:
        if thread.is_alive():  # closed early (worker.quit()): ask the core to stop
            stop.set()
        thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")
