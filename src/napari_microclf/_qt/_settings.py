"""What the widgets remember across napari sessions: folders and main settings.

One small JSON file, one section per widget (``{"train": {...}, "predict": {...}}``), under
the user's config folder (``~/.config/napari-microclf/settings.json`` on Linux, Qt's
``GenericConfigLocation`` elsewhere), or at ``$MICROCLF_SETTINGS`` when that is set (the
tests point it to a temporary folder). Widgets restore their values when they are built and
save them when they change. Writes are atomic; a missing or unreadable file is an empty
store (the widgets start from their defaults), and a file that cannot be written is
skipped: remembering settings is a convenience, never a reason for a widget to fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.settings import widget_settings_file

FILE = "settings.json"


def path() -> Path:
    """The settings file: ``$MICROCLF_SETTINGS``, or the user's config folder's."""
    chosen = widget_settings_file()
    if chosen is not None:
        return chosen
    from qtpy.QtCore import QStandardPaths

    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    return Path(base or Path.home() / ".config") / "napari-microclf" / FILE


def _read() -> dict:
    try:
        data = json.loads(path().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or not ours: start from the defaults
        return {}
    return data if isinstance(data, dict) else {}


def load(section: str) -> dict:
    """The values saved for ``section`` (a widget), {} if none."""
    values = _read().get(section)
    return dict(values) if isinstance(values, dict) else {}


def save(section: str, values: dict) -> bool:
    """Merge ``values`` into ``section`` and write the file atomically; False if it could
    not be written (a read-only home, a full disk)."""
    data = _read()
    data[section] = {**(data.get(section) if isinstance(data.get(section), dict) else {}), **values}
    target = path()
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        return False
    return True
