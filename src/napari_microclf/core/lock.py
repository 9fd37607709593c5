"""One writer at a time: lock files for model folders and for a dataset's ``split.json``.

A lock is a small JSON file (``pid``, ``host``, ``command``, ``started``) created with
``O_CREAT | O_EXCL``, so of two processes that try at once exactly one gets it. The other
gets a :class:`~napari_microclf.core.errors.LockedError` that names the holder::

    model folder /data/model is being written by microclf train (pid 1234 on lab-pc,
    started 10:02); wait for it to finish or choose another --out

A lock left by a killed process is stale and is cleared (with a note): on this host when its
process is gone, on another host (a shared drive) when it is older than
:data:`STALE_AFTER_S`. Locks are re-entrant within one thread (``train`` holds the model
folder's lock and ``write_bundle`` takes it again); another thread of the same process is
refused like another process.

- :func:`model_lock`: ``MODEL/.microclf.lock``, held by a training for its whole run and by
  ``restore`` and ``write_bundle``; refuses at once.
- :func:`split_lock`: ``DATASET/.split.json.lock``, held while ``split.json`` is read,
  updated and written; waits a few seconds for the holder, then refuses.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LockedError, OutputError

MODEL_LOCK = ".microclf.lock"
SPLIT_LOCK = ".split.json.lock"
STALE_AFTER_S = 24 * 3600  # a lock from another host older than this is stale
SPLIT_WAIT_S = 5.0  # how long an update of split.json waits for another one to finish
UNWRITTEN_AFTER_S = 60  # a lock file still empty after this is a killed process's
PROCESS_START = time.time()  # stale temporary files are those older than this process

_HELD: dict[str, list] = {}  # lock path -> [thread id, depth] for the locks this process holds
_HELD_LOCK = threading.Lock()


@dataclass
class Lock:
    """A lock held by this thread; ``note`` says when a stale lock was cleared first."""

    path: Path
    note: str | None = None


def _host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return False
    return True


def read_lock(path: str | Path) -> dict | None:
    """The holder recorded in a lock file (None: no lock; ``{}``: unreadable or empty)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def holder_text(info: dict) -> str:
    """``microclf train (pid 1234 on lab-pc, started 10:02)``."""
    if not info:
        return "another microclf process"
    started = str(info.get("started", ""))
    try:
        when = _dt.datetime.fromisoformat(started)
        day = "" if when.date() == _dt.date.today() else f"{when:%Y-%m-%d} "
        started = f"{day}{when:%H:%M}"
    except ValueError:
        pass
    return (
        f"{info.get('command') or 'microclf'} (pid {info.get('pid', '?')} on "
        f"{info.get('host', '?')}, started {started or '?'})"
    )


def stale_reason(path: Path, info: dict | None) -> str | None:
    """Why the lock at ``path`` is stale (its process is gone), or None if it is held."""
    if info is None:
        return None
    if not info:  # created but never written: a process killed at that instant
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        return "an empty lock file" if age > UNWRITTEN_AFTER_S else None
    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    if info.get("host") == _host():
        if pid == os.getpid():
            with _HELD_LOCK:
                held = str(path) in _HELD
            return None if held else "left by an earlier run of this process"
        return None if pid_alive(pid) else f"process {pid} is no longer running"
    try:
        age = time.time() - float(info.get("time", 0))
    except (TypeError, ValueError):
        age = STALE_AFTER_S + 1
    return f"older than {STALE_AFTER_S // 3600} h" if age > STALE_AFTER_S else None


def _try_create(path: Path, command: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    info = {
        "pid": os.getpid(),
        "host": _host(),
        "command": command,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "time": time.time(),
    }
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    return True


def _acquire(path: Path, command: str, wait: float, refusal) -> Lock | None:
    """Take the lock (or re-enter it in this thread); None when it stays held by another."""
    key, me = str(path), threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held[0] == me:
            held[1] += 1
            return Lock(path)
    deadline = time.monotonic() + wait
    note = None
    while True:
        with _HELD_LOCK:
            if key not in _HELD and _try_create(path, command):
                _HELD[key] = [me, 1]
                return Lock(path, note)
        info = read_lock(path)
        reason = stale_reason(path, info)
        if reason is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            note = (
                f"Cleared a stale lock in {path.parent} left by "
                f"{holder_text(info or {})}: {reason}."
            )
            continue
        if time.monotonic() >= deadline:
            raise LockedError(refusal(holder_text(info or {})))
        time.sleep(0.1)


def _release(lock: Lock) -> None:
    key = str(lock.path)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            lock.path.unlink()


def holds(path: str | Path) -> bool:
    """Whether this thread holds the model lock of folder ``path``."""
    held = _HELD.get(str(Path(path).expanduser().resolve() / MODEL_LOCK))
    return held is not None and held[0] == threading.get_ident()


def is_locked(folder: str | Path) -> bool:
    """Whether another process (or thread) holds the model folder's lock right now."""
    path = Path(folder).expanduser().resolve() / MODEL_LOCK
    info = read_lock(path)
    if info is None:
        return False
    held = _HELD.get(str(path))
    if held is not None:
        return held[0] != threading.get_ident()
    return stale_reason(path, info) is None


def _model_refusal(folder: Path, holder: str) -> str:
    return (
        f"model folder {folder} is being written by {holder}; wait for it to finish "
        "or choose another --out"
    )


def refuse_if_locked(folder: str | Path) -> None:
    """Raise the LockedError :func:`model_lock` would, naming the holder, when another
    process holds the model folder's lock now: said before TensorFlow starts, not after."""
    if is_locked(folder):
        path = Path(folder).expanduser().resolve()
        raise LockedError(_model_refusal(path, holder_text(read_lock(path / MODEL_LOCK) or {})))


@contextlib.contextmanager
def model_lock(folder: str | Path, command: str = "microclf") -> Iterator[Lock]:
    """Hold ``FOLDER/.microclf.lock`` (creating the folder if needed) for the block.

    Refuses at once with a :class:`LockedError` naming the holder. A folder this lock created
    and that is still empty afterwards (a training stopped or failed) is removed again.
    """
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; choose another output folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the model folder {folder} ({exc.strerror or exc}); "
            "choose another output folder"
        ) from exc

    try:
        lock = _acquire(folder / MODEL_LOCK, command, 0.0, lambda h: _model_refusal(folder, h))
    except PermissionError as exc:
        raise OutputError(
            f"cannot write in the model folder {folder} (permission denied); "
            "choose another output folder"
        ) from exc
    try:
        yield lock
    finally:
        _release(lock)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


@contextlib.contextmanager
def split_lock(
    root: str | Path, command: str = "microclf", wait: float | None = None
) -> Iterator[Lock | None]:
    """Hold ``DATASET/.split.json.lock`` for the block, waiting up to ``wait`` seconds
    (:data:`SPLIT_WAIT_S`) for another holder, then raising a LockedError naming it.

    A dataset where no file can be created (read-only) is not locked: nobody can write its
    ``split.json`` there either, and reading it needs no lock (yields None).
    """
    root = Path(root).expanduser().resolve()
    wait = SPLIT_WAIT_S if wait is None else wait

    def refusal(holder: str) -> str:
        return (
            f"the split of dataset {root} is being updated by {holder}; try again when it "
            "has finished"
        )

    try:
        lock = _acquire(root / SPLIT_LOCK, command, wait, refusal)
    except (PermissionError, FileNotFoundError):
        lock = None
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        lock = None
    try:
        yield lock
    finally:
        if lock is not None:
            _release(lock)
