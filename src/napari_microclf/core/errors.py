"""The errors microclf raises on purpose.

Every error that names a file or a setting and says what to do derives from
:class:`MicroclfError`, so the widgets and the command line can tell ours (shown as a one-line
message) from unexpected ones (shown with their traceback). The subclasses keep the builtin
base they had (``ValueError``, ``RuntimeError``, ``OSError``) so ``except ValueError`` in a
user's script still catches them.
"""

from __future__ import annotations


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
