"""The errors microclf raises on purpose.

Every error that names a file or a setting and says what to do derives from
:class:`MicroclfError`, so the widgets and the command line can tell ours (shown as a one-line
message) from unexpected ones (shown with their traceback). The subclasses keep the builtin
base they had (``ValueError``, ``RuntimeError``, ``OSError``) so ``except ValueError`` in a
user's script still catches them.
"""

from __future__ import annotations

import re
from pathlib import Path


class MicroclfError(Exception):
    """Base of the errors microclf raises with a message meant for the user."""


class ImageReadError(MicroclfError, ValueError):
    """An image file that cannot be read; the message names the file and what to do."""


class DatasetError(MicroclfError, ValueError):
    """A dataset problem, said so that the user knows what to do."""


class BundleError(MicroclfError, ValueError):
    """A model bundle that is missing, corrupt or does not match; says what to do."""


class WeightsError(MicroclfError, RuntimeError):
    """Pretrained weights that cannot be had; the message says how to get them."""


class OutputError(MicroclfError, OSError):
    """A destination (model folder, CSV, dataset) that cannot be written; says what to do."""


class LockedError(MicroclfError, RuntimeError):
    """A model folder or dataset another microclf process is writing right now."""


class ExportError(MicroclfError, RuntimeError):
    """An export that cannot be made (a missing package, an unsupported model); says what to
    do."""


class DeviceError(MicroclfError, ValueError):
    """The devices asked for (``--devices``) are not there."""


class SettingError(MicroclfError, ValueError):
    """A ``MICROCLF_*`` environment variable whose value cannot be used; names it and says what
    it takes."""


NO_READER = "no image reader recognises its contents"  # imageio's and Pillow's "unknown file"
_IMAGEIO_NO_BACKEND = re.compile(
    r"Could not find a backend to open `[^`]*`*\s+with iomode `\w+`\.?"
)
_IMAGEIO_HINTS = re.compile(
    r"\s*Based on the extension, the following plugins might add capable backends:"
    r"(?:\s+[\w.-]+:\s+pip install \S+?(?=\)|\s|$))*"
)
_TIFF_HEADER = re.compile(r":? ?header=b(['\"]).*?\1$")  # tifffile: the file's first raw bytes


def one_line(
    error: BaseException | str,
    path: str | Path | None = None,
    *,
    named: bool = False,
    limit: int | None = None,
) -> str:
    """``error`` (an exception or a message) as one line for a message that names the file.

    imageio's list of plugins to install is dropped and its "could not find a backend" said
    as :data:`NO_READER`; whitespace, line breaks included, is collapsed; a leading
    ``"<path>: "`` or ``"<path> page <n>: "`` is removed (the caller names the file).

    ``named``: a library's exception as one clause, ``"ValueError: <its first line>"``
    (tifffile's raw header bytes and a closing ``.`` or ``:`` cut); a file that imageio or
    Pillow does not recognise is just :data:`NO_READER`. ``limit``: at most this many
    characters, a cut marked by ``...``.

    Examples
    --------
    >>> one_line(ValueError("not a TIFF file."), named=True)
    'ValueError: not a TIFF file'
    >>> one_line("a.tif page 3: cannot   be read", "a.tif")
    'cannot be read'
    """
    text = str(error).strip()
    if named:
        if "Could not find a backend" in text or "cannot identify image file" in text:
            return NO_READER
        text = text.splitlines()[0].strip().rstrip(".:") if text else ""
        text = _TIFF_HEADER.sub("", " ".join(text.split()))
    else:
        text = _IMAGEIO_NO_BACKEND.sub(NO_READER, _IMAGEIO_HINTS.sub("", text))
        text = " ".join(text.split())
    if path is not None:
        names = "|".join(re.escape(n) for n in (str(path), Path(path).name))
        text = re.sub(rf"^(?:{names})(?: page \d+)?: ", "", text, count=1)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    if named:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or "unknown error"
