"""The models the widgets have loaded: one Predictor per bundle, engine and precision.

Loading a bundle takes seconds, so Predict, Explain and Label next share the loaded
Predictors: :func:`get_predictor` loads one once and serves it until the bundle's files
change (a new training, a restored ``previous/``), keeping the ``CACHE_SIZE`` most recently
used. :func:`forget_model` drops a bundle's Predictors at once; :func:`cache_info` says how
many times the cache served a loaded one and how many times it loaded one, as
``functools.lru_cache`` does.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..core.bundle import META_FILE, MODEL_FILE
from ..core.explain import Explainer
from ..core.predict_options import DEFAULTS
from ..core.predictor import Predictor

CACHE_SIZE = 2  # loaded models kept; the least recently used one is dropped beyond this


class CacheInfo(NamedTuple):
    hits: int  # a loaded Predictor served
    misses: int  # a Predictor loaded
    maxsize: int
    currsize: int


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


class PredictorCache:
    """Loaded Predictors by (bundle, engine, precision), the least recently used dropped
    beyond ``size``. ``load`` makes one (``Predictor``; the tests give a stand-in)."""

    def __init__(self, size: int = CACHE_SIZE, load: Callable[..., Predictor] = Predictor):
        self.size = size
        self._load = load
        self._loaded: OrderedDict[tuple, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0
        # Predictor -> its Grad-CAM Explainer, gone with the Predictor
        self._explainers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(
        self,
        bundle: str | Path,
        engine: str = DEFAULTS.engine,
        precision: str = DEFAULTS.precision,
    ) -> Predictor:
        """The Predictor of ``bundle`` on ``engine`` at ``precision``, loaded once and reused
        until the bundle is rewritten."""
        folder = Path(bundle).expanduser().resolve()
        # the files' identity, not just a time: a restored model.keras is another file whose
        # time may equal the replaced one's
        files = (folder,) if folder.is_file() else (folder / MODEL_FILE, folder / META_FILE)
        key = (str(folder), engine, precision) + tuple(
            (st.st_ino, st.st_mtime_ns, st.st_size) if (st := _stat(f)) else None for f in files
        )
        with self._lock:
            if key in self._loaded:
                self._hits += 1
            else:
                for old in [k for k in self._loaded if k[0] == key[0]]:
                    del self._loaded[old]  # the bundle was rewritten
                self._loaded[key] = self._load(folder, engine=engine, precision=precision)
                self._misses += 1
                while len(self._loaded) > self.size:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def forget(self, bundle: str | Path) -> None:
        """Drop the loaded models of ``bundle`` (it was replaced or restored)."""
        folder = str(Path(bundle).expanduser().resolve())
        with self._lock:
            for old in [k for k in self._loaded if k[0] == folder]:
                del self._loaded[old]

    def explainer(self, bundle: str | Path) -> Explainer:
        """The Grad-CAM :class:`core.explain.Explainer` of ``bundle``'s Predictor (made once
        per loaded Predictor)."""
        predictor = self.get(bundle)
        explainer = self._explainers.get(predictor)
        if explainer is None:
            explainer = self._explainers[predictor] = Explainer(predictor.bundle)
        return explainer

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.size, len(self._loaded))

    def __len__(self) -> int:
        return len(self._loaded)


_PREDICTORS = PredictorCache()  # the one the widgets share


def get_predictor(
    bundle: str | Path, engine: str = DEFAULTS.engine, precision: str = DEFAULTS.precision
) -> Predictor:
    """The widgets' Predictor of ``bundle`` (see :meth:`PredictorCache.get`)."""
    return _PREDICTORS.get(bundle, engine, precision)


def get_explainer(bundle: str | Path) -> Explainer:
    """The widgets' Grad-CAM Explainer of ``bundle`` (see :meth:`PredictorCache.explainer`)."""
    return _PREDICTORS.explainer(bundle)


def forget_model(bundle: str | Path) -> None:
    """Drop the loaded models of ``bundle`` from the widgets' cache."""
    _PREDICTORS.forget(bundle)


def cache_info() -> CacheInfo:
    """Hits, misses (loads), size and models loaded now of the widgets' cache."""
    return _PREDICTORS.info()
