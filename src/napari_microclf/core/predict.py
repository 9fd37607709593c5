"""Prediction: per page class, confidence and all probabilities, for arrays, files and folders.

Pages of a stack are streamed in batches, so memory is bounded by the batch, not the stack.
The model is loaded once per :class:`Predictor` and its forward pass traced once.
"""

from __future__ import annotations

import csv
import os
import queue
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import ImageReadError, is_image_file, open_image, preprocess
from .model import Bundle, load_bundle


@dataclass(frozen=True)
class PagePrediction:
    file: str | None
    page: int
    class_name: str
    confidence: float
    probabilities: dict[str, float]

    def label(self, threshold: float = 0.0) -> str:
        """The class, or ``"uncertain"`` below ``threshold``."""
        return self.class_name if self.confidence >= threshold else "uncertain"


class Predictor:
    """A loaded bundle ready to classify pages."""

    def __init__(self, bundle: Bundle | str | Path, batch_size: int = 32):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.class_names = self.bundle.class_names
        self.spec = self.bundle.preprocess
        self.batch_size = int(batch_size)
        self.prefetch = 1
        self._forward = None

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        if self._forward is None:
            import tensorflow as tf

            model = self.bundle.model
            size = self.spec.image_size
            self._forward = tf.function(
                lambda x: model(x, training=False), reduce_retracing=True,
                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        return np.asarray(self._forward(batch))

    def _result(self, probs: np.ndarray, file, page) -> PagePrediction:
        i = int(probs.argmax())
        return PagePrediction(
            None if file is None else str(file), int(page), self.class_names[i],
            float(probs[i]), {n: float(p) for n, p in zip(self.class_names, probs, strict=True)})

    def _batches(self, pages):
        size = self.spec.image_size
        buf = np.empty((self.batch_size, size, size, 3), dtype=np.float32)
        keys: list = []
        for file, page, array in pages:
            buf[len(keys)] = preprocess(array, self.spec)
            keys.append((file, page))
            if len(keys) == self.batch_size:
                yield buf, keys
                buf = np.empty_like(buf)  # the consumer still holds the last one
                keys = []
        if keys:
            yield buf[: len(keys)], keys

    def predict_pages(self, pages: Iterable[tuple[object, int, np.ndarray]],
                      should_stop=None) -> Iterator[PagePrediction]:
        """Classify ``(file, page, array)`` items, batching as they stream in.

        Pages are read and preprocessed in a background thread while the model works on the
        previous batch; at most ``prefetch`` + 2 batches exist at any time.
        """
        for buf, keys in _prefetch(self._batches(pages), self.prefetch):
            probs = self._probabilities(buf)
            for (file, page), p in zip(keys, probs, strict=True):
                yield self._result(p, file, page)
            if should_stop is not None and should_stop():
                return

    def predict_array(self, array: np.ndarray, pages: bool = False) -> list[PagePrediction]:
        """One image ``(Y, X[, C])``, or with ``pages=True`` a stack ``(P, Y, X[, C])``."""
        array = np.asarray(array)
        items = ((None, i, a) for i, a in enumerate(array)) if pages else [(None, 0, array)]
        return list(self.predict_pages(items))

    def predict_file(self, path: str | Path, should_stop=None) -> Iterator[PagePrediction]:
        with open_image(path) as f:
            yield from self.predict_pages(((path, i, f.page(i)) for i in range(len(f))),
                                          should_stop)

    def predict_paths(self, paths: Sequence[str | Path], should_stop=None
                      ) -> Iterator[PagePrediction]:
        """Files and folders (searched recursively for images), in sorted order."""
        for path in expand_paths(paths):
            yield from self.predict_file(path, should_stop)
            if should_stop is not None and should_stop():
                return


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetch(iterable, depth: int = 1):
    """Run ``iterable`` in a thread, ``depth`` items ahead of the consumer."""
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))

    worker = threading.Thread(target=produce, name="microclf-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q)
                          and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or folder")
    return out


def predict(bundle, image_or_path, batch_size: int = 32) -> list[PagePrediction]:
    """Classify an array (one page), a file (every page), a folder, or a list of paths."""
    predictor = bundle if isinstance(bundle, Predictor) else Predictor(bundle, batch_size)
    if isinstance(image_or_path, np.ndarray):
        return predictor.predict_array(image_or_path)
    paths = [image_or_path] if isinstance(image_or_path, (str, Path)) else list(image_or_path)
    return list(predictor.predict_paths(paths))


# Cells a spreadsheet program would run as a formula (OWASP, "CSV Injection"): these starts.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value) -> str:
    """``value`` as a CSV cell that spreadsheets show as text, never run as a formula.

    Text starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'``
    (OWASP's advice), unless it is a plain number such as ``-0.5``.
    """
    text = str(value)
    if text.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def _write_csv_rows(path: str | Path, rows: Iterable[Sequence]) -> int:
    """Write ``rows`` (header included) atomically: UTF-8, ``newline=""``, every cell made safe.

    Returns the number of rows written after the header.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            for row in rows:
                w.writerow([csv_cell(v) for v in row])
                written += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return max(written - 1, 0)


def write_csv(predictions: Iterable[PagePrediction], path: str | Path,
              class_names: Sequence[str], threshold: float = 0.0) -> int:
    """CSV with file, page, class, confidence and one probability column per class.

    UTF-8 with ``\\r\\n`` line ends on every platform; text cells that start like a formula
    (``=``, ``+``, ``-``, ``@``, tab, CR: class names come from folder names, file names from
    users) are written with a leading ``'`` (see :func:`csv_cell`). Returns the row count.
    """
    def rows():
        yield ["file", "page", "class", "confidence", *class_names]
        for p in predictions:
            yield [p.file or "", p.page, p.label(threshold), f"{p.confidence:.4f}",
                   *(f"{p.probabilities[c]:.4f}" for c in class_names)]

    return _write_csv_rows(path, rows())
