"""Files on disk: a file's content digest (memoised) and a text file written atomically.

What every layer above needs and nothing else: the dataset names its files by content, a
bundle records its files' SHA-256, the feature cache keys entries by content, and reports
and ``split.json`` are replaced whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from .errors import OutputError

DIGEST_MEMO_SIZE = 4096  # file digests remembered (a few hundred kB), least recently used out
_DIGEST_MEMO: OrderedDict = OrderedDict()
_DIGEST_LOCK = threading.Lock()


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """The hex digest of the file's bytes, memoised by (path, size, mtime, inode).

    The memo keeps the :data:`DIGEST_MEMO_SIZE` most recently used digests, so a long session
    over many datasets does not grow without bound.
    """
    st = os.stat(path)
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, algorithm)
    with _DIGEST_LOCK:
        digest = _DIGEST_MEMO.get(memo_key)
        if digest is not None:
            _DIGEST_MEMO.move_to_end(memo_key)
            return digest
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _DIGEST_LOCK:
        _DIGEST_MEMO[memo_key] = digest
        while len(_DIGEST_MEMO) > DIGEST_MEMO_SIZE:
            _DIGEST_MEMO.popitem(last=False)
    return digest


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (another thread may
    create files meanwhile), else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp_for_user(**kwargs) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file gets the permissions a plain ``open()`` would give it
    (0666 less the user's umask), not mkstemp's 0600: a CSV, a ``split.json``, an exported
    zip or an added image renamed into place is readable as the user's other files are."""
    fd, tmp = tempfile.mkstemp(**kwargs)
    with contextlib.suppress(OSError):  # no permissions there (FAT, some shares): as made
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, then rename it into
    place: a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = mkstemp_for_user(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def refuse_destroying(
    out: str | Path, *, inputs=(), protected=(), what: str = "the output"
) -> None:
    """Raise OutputError (one line) when writing or replacing ``out`` would destroy what
    microclf did not write: the working directory or a folder above it, an input (one of the
    files ``inputs``, or a folder that holds one), or a ``protected`` folder (a model, a
    dataset), a path inside one or a folder above one. Symbolic links are followed to what
    they name. Called before any work is done."""
    out = Path(out).expanduser()
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        where = (
            "the working directory"
            if real == cwd
            else f"a folder above the working directory {cwd}"
        )
        raise OutputError(f"{what} {out} is {where}; choose a new file or folder to write")
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if real == src:
            raise OutputError(
                f"{what} {out} is one of the inputs; writing it would replace it: choose "
                "another path"
            )
        if real in src.parents:
            raise OutputError(
                f"{what} {out} is a folder that holds the input {given}; choose another path"
            )
    for folder in protected:
        p = Path(folder).expanduser().resolve()
        if real == p or p in real.parents or real in p.parents:
            how = "is" if real == p else "is inside" if p in real.parents else "holds"
            raise OutputError(f"{what} {out} {how} {p}; choose a path outside it")
