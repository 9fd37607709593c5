"""Every ``MICROCLF_*`` environment variable, declared once: name, type, default, meaning.

The modules that need one read it through an accessor below. Accessors read the environment
at each call, never at import, so a variable set later (by a test, or by a script before it
calls microclf) counts. The README's table "Environment variables" lists the same variables
(``tests/test_settings.py`` checks it). A number that is not a number is a
:class:`~.errors.SettingError` naming the variable; an empty variable is an unset one.
Keras' own ``$KERAS_HOME`` (:func:`keras_home`) is read here too, so that every folder the
core finds through the environment is found in this one module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: ``type`` and ``default`` as the README's table says them."""

    name: str
    type: str
    default: str
    meaning: str

    def raw(self) -> str | None:
        """The variable's value, or None where it is unset or blank."""
        value = os.environ.get(self.name, "")
        return value if value.strip() else None


CACHE = EnvVar(
    "MICROCLF_CACHE",
    "folder",
    "`$XDG_CACHE_HOME/napari-microclf/bundles` (`~/.cache/...`)",
    "where zipped models (`.zip`) are unpacked, once per content",
)
CACHE_MAX_GB = EnvVar(
    "MICROCLF_CACHE_MAX_GB",
    "number (GB)",
    "10",
    "the size cap of a dataset's feature cache (`.microclf-cache`); beyond it, the folders "
    "used longest ago are pruned",
)
ENGINE = EnvVar(
    "MICROCLF_ENGINE",
    "`openvino`, `tensorflow` or `auto`",
    "`auto`: OpenVINO where installed, else TensorFlow",
    "the engine that `auto` means (`--engine auto`, the widgets' default)",
)
MEMMAP_MB = EnvVar(
    "MICROCLF_MEMMAP_MB",
    "number (MB)",
    "256",
    "a training's assembled features above this size are memory-mapped from the feature "
    "cache, not held in memory (0: always)",
)
OFFLINE = EnvVar(
    "MICROCLF_OFFLINE",
    "flag (set, not `0`)",
    "unset",
    "`--weights auto` never tries to download the ImageNet weights of EfficientNetB0",
)
PAGE_MEMORY_MB = EnvVar(
    "MICROCLF_PAGE_MEMORY_MB",
    "number (MB)",
    "an eighth of the free memory, at most 1024",
    "decoded pages a training keeps between epochs (0: every page is read every epoch)",
)
SETTINGS = EnvVar(
    "MICROCLF_SETTINGS",
    "file",
    "`~/.config/napari-microclf/settings.json` (Qt's config folder)",
    "the file where the widgets remember folders and settings",
)
SKIP_SYSTEM_DEPS = EnvVar(
    "MICROCLF_SKIP_SYSTEM_DEPS",
    "flag (set)",
    "unset",
    "`make` does not check or install the system libraries (read by "
    "`scripts/system-deps.sh`, not by Python)",
)

DECLARED = (
    CACHE,
    CACHE_MAX_GB,
    ENGINE,
    MEMMAP_MB,
    OFFLINE,
    PAGE_MEMORY_MB,
    SETTINGS,
    SKIP_SYSTEM_DEPS,
)


def bundle_cache() -> Path:
    """Where zipped models are unpacked: ``$MICROCLF_CACHE``, else
    ``$XDG_CACHE_HOME/napari-microclf/bundles`` (``~/.cache/...``)."""
    if CACHE.raw():
        return Path(os.environ[CACHE.name]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "napari-microclf" / "bundles"


def cache_max_gb() -> float:
    """``$MICROCLF_CACHE_MAX_GB``: the feature cache's size cap in GB (10)."""
    return _number(CACHE_MAX_GB, "gigabytes")


def engine() -> str | None:
    """``$MICROCLF_ENGINE`` as it is written (checked by ``engine.check_engine``), or None."""
    return ENGINE.raw()


def memmap_mb() -> float:
    """``$MICROCLF_MEMMAP_MB``: assembled features above this many MB are memory-mapped
    (256; 0 maps every set)."""
    return _number(MEMMAP_MB, "megabytes")


def offline() -> bool:
    """``$MICROCLF_OFFLINE`` set to anything but ``0``: no download of the ImageNet weights."""
    return (OFFLINE.raw() or "0").strip() != "0"


def page_memory_mb() -> float | None:
    """``$MICROCLF_PAGE_MEMORY_MB`` in MB, or None where unset (the caller's default)."""
    return _number(PAGE_MEMORY_MB, "megabytes") if PAGE_MEMORY_MB.raw() else None


def keras_home() -> Path:
    """Keras' cache folder: ``$KERAS_HOME``, else ``~/.keras`` (the ImageNet weights, the
    converted Lite0 weights and the OpenVINO conversions live under it)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()


def widget_settings_file() -> Path | None:
    """``$MICROCLF_SETTINGS``, or None where unset (the user's config folder)."""
    return Path(os.environ[SETTINGS.name]).expanduser() if SETTINGS.raw() else None


def _number(var: EnvVar, unit: str) -> float:
    """``var``'s value as a finite number; its declared default where unset or blank."""
    text = var.raw()
    if text is None:
        return float(var.default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SettingError(
            f"${var.name} is {text!r}, not a number of {unit}: set a number, or unset it "
            f"for the default ({var.default})"
        )
    return value
