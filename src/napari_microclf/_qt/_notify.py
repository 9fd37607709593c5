"""A napari notification in one call, as every widget says what it refused or did."""

from __future__ import annotations


def notify(kind: str, text: str) -> None:
    """``kind``: ``"info"``, ``"warning"`` or ``"error"`` (napari's ``show_<kind>``)."""
    from napari.utils import notifications

    getattr(notifications, f"show_{kind}")(text)
