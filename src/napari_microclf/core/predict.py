"""Prediction: per page class, confidence and all probabilities, for arrays, files and folders.

Pages of a stack are streamed in batches, so memory is bounded by the batch, not the stack.
The model is loaded once per :class:`Predictor` and its forward pass traced once.

Folders are classified past bad files: :func:`predict_folder` classifies every page it can
read, reports each file it cannot (unreadable, corrupt, too small, wrong channels) as a
:class:`FileError`, streams the rows to the CSV as they come and says what happened in one
summary line.

Test-time augmentation (``tta=True``) classifies each page as itself and its three flips
(:func:`flip_views`) in one forward pass and averages the four probability vectors.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError, MicroclfError, OutputError
from .images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    array_pages,
    is_image_file,
    open_image,
    preprocess,
    shape_problem,
)
from .model import META_FILE, Bundle, load_bundle

# What a bad file may raise while it is read and preprocessed: ours (ImageReadError, ...) and
# the builtin errors of decoders that get past ImageFile's wrapping. Anything else is a bug
# and stops the run with its traceback.
_FILE_ERRORS = (MicroclfError, OSError, ValueError, IndexError, MemoryError)

TTA_VIEWS = 4  # the page, its horizontal flip, its vertical flip and both flips


def flip_views(x: np.ndarray) -> np.ndarray:
    """``(B, H, W, C)`` model input as its :data:`TTA_VIEWS` flipped views, ``(4B, H, W, C)``.

    Rows ``0..B-1`` are ``x`` itself, then its horizontal flips (mirrored left-right), its
    vertical flips (upside down) and both (a 180-degree turn): view ``v`` of page ``i`` is row
    ``v * B + i``. Model input is square, so each view has the input's shape.
    """
    x = np.asarray(x)
    return np.concatenate([x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]])


def mean_of_views(probs: np.ndarray, n_views: int = TTA_VIEWS) -> np.ndarray:
    """The probabilities of :func:`flip_views`' ``(4B, K)`` rows averaged per page: ``(B, K)``."""
    probs = np.asarray(probs)
    return probs.reshape(n_views, len(probs) // n_views, *probs.shape[1:]).mean(axis=0)


# Keras ``predict`` traces the model once (seconds for EfficientNet on a CPU), then runs a
# batch faster than an eager call, which spends about half a second in Python per call: a
# few batches (a typical test set) run eagerly, more through ``predict``.
EAGER_PASSES = 8


def uses_eager(model, n_images: int, batch_size: int) -> bool:
    """Whether :func:`tta_probabilities` should call ``model`` eagerly for ``n_images``: a
    few forward passes, and no ``predict`` function traced already."""
    passes = -(-int(n_images) // max(int(batch_size), 1))
    return passes <= EAGER_PASSES and getattr(model, "predict_function", None) is None


def tta_probabilities(
    model,
    x: np.ndarray,
    batch_size: int = 32,
    *,
    with_plain: bool = False,
    eager: bool | None = None,
):
    """A Keras classifier's probabilities for ``x`` ``(N, H, W, 3)`` averaged over the four
    flipped views of each image (test-time augmentation).

    Runs ``batch_size`` images (``4 * batch_size`` views) per forward pass, in inference
    mode (augmentation layers off), so memory is bounded by the batch. ``eager``: call the
    model directly rather than through Keras ``predict`` (default: :func:`uses_eager`).
    Returns ``(N, n_classes)``; with ``with_plain`` also the unflipped views' own
    probabilities (the plain prediction, at no extra cost): ``(tta, plain)``.
    """
    x = np.asarray(x, dtype=np.float32)
    step = max(int(batch_size), 1)
    if eager is None:
        eager = uses_eager(model, len(x), step)
    empty = np.zeros((0, *model.output_shape[1:]), np.float32)
    mean, plain = [empty], [empty]
    for i in range(0, len(x), step):
        views = flip_views(x[i : i + step])
        probs = (
            np.asarray(model(views, training=False))
            if eager
            else model.predict(views, batch_size=len(views), verbose=0)
        )
        mean.append(mean_of_views(probs))
        plain.append(probs[: len(views) // TTA_VIEWS])
    if with_plain:
        return np.concatenate(mean), np.concatenate(plain)
    return np.concatenate(mean)


@dataclass(frozen=True)
class PagePrediction:
    file: str | None
    page: int
    class_name: str
    confidence: float
    probabilities: dict[str, float]
    # the page's feature distance from the training data over the bundle's threshold (see
    # core/familiar.py): above 1 the page is unlike the training images. None: the bundle
    # has no familiarity description (trained before it existed).
    unfamiliar_score: float | None = None
    # the probabilities are the mean over the page's four flipped views (test-time
    # augmentation); the unfamiliar score is still the unflipped page's
    tta: bool = False

    @property
    def unfamiliar(self) -> bool:
        """The page lies beyond the training data (its class means little, whatever the
        confidence)."""
        return self.unfamiliar_score is not None and self.unfamiliar_score > 1.0

    def label(self, threshold: float = 0.0) -> str:
        """The class; ``"unfamiliar"`` for a page unlike the training images, else
        ``"uncertain"`` below ``threshold``."""
        if self.unfamiliar:
            return "unfamiliar"
        return self.class_name if self.confidence >= threshold else "uncertain"


@dataclass(frozen=True)
class FileError:
    """A file (or the rest of a file, from ``page`` on) that could not be classified.

    ``message`` is one line saying what is wrong, without the path; ``str()`` adds the path.
    """

    path: str
    message: str
    page: int | None = None  # the page that failed; None: the file could not be opened

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class FolderResult(Sequence):
    """What :func:`predict_folder` did: the classified pages, in order, and the files it could
    not read.

    It is a sequence of :class:`PagePrediction` (``len``, indexing and iteration give the
    pages), so code written for a plain list of pages keeps working.
    """

    predictions: list[PagePrediction] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    n_files: int = 0  # files looked at (classified, failed, or both for a half-read stack)
    stopped: bool = False  # should_stop() ended the run early
    csv_path: Path | None = None  # the CSV written (the .partial file if the run was stopped)
    resumed: int = 0  # rows kept from an interrupted run's .partial CSV (resume=True)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i):
        return self.predictions[i]

    def __iter__(self) -> Iterator[PagePrediction]:
        return iter(self.predictions)

    @property
    def ok(self) -> bool:
        """At least one page was classified."""
        return bool(self.predictions)

    def summary(self, max_listed: int = 3) -> str:
        """One line: pages and files classified, files that failed (the first few with their
        reason), and where the CSV is."""
        pages = len(self.predictions)
        files = len({p.file for p in self.predictions})
        if pages:
            text = (
                f"Classified {_plural(pages, 'page')} from "
                f"{files if files == self.n_files else f'{files} of {self.n_files}'} "
                f"file{'s' if self.n_files != 1 else ''}"
            )
        else:
            text = f"No page could be classified ({_plural(self.n_files, 'file')} tried)"
        if self.resumed:
            text += (
                f" after {_plural(self.resumed, 'row')} kept from the interrupted run"
                if pages
                else f"; {_plural(self.resumed, 'row')} kept from the interrupted run"
            )
        if self.stopped:
            text += " before the run was stopped"
        if self.errors:
            read = {p.file for p in self.predictions}
            in_part = sum(e.path in read for e in self.errors)
            notes = [f"{in_part} only in part"] if in_part else []
            if self.csv_path is not None:
                notes.append("listed in the CSV's error column")
            listed = "; ".join(
                f"{Path(e.path).name}: {e.message.rstrip('.')}" for e in self.errors[:max_listed]
            )
            more = len(self.errors) - max_listed
            text += (
                f"; {_plural(len(self.errors), 'file')} could not be read"
                + (f" ({'; '.join(notes)})" if notes else "")
                + f": {listed}"
                + (f"; and {more} more" if more > 0 else "")
            )
        if self.csv_path is not None:
            text += f". CSV: {self.csv_path}"
        return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


_IMAGEIO_HINTS = re.compile(
    r"\s*Based on the extension, the following plugins might add capable backends:"
    r"(?:\s+[\w.-]+:\s+pip install \S+?(?=\)|\s|$))*"
)
_IMAGEIO_NO_BACKEND = re.compile(
    r"Could not find a backend to open `[^`]*`*\s+with iomode "
    r"`\w+`\.?"
)


def one_line(message: str, path: str | Path | None = None) -> str:
    """``message`` condensed to one line: imageio's plugin hints dropped, whitespace collapsed,
    a leading ``"<path>: "`` or ``"<path> page <n>: "`` removed (the caller names the file)."""
    text = _IMAGEIO_HINTS.sub("", str(message))
    text = _IMAGEIO_NO_BACKEND.sub("no installed reader recognises its content", text)
    text = " ".join(text.split())
    if path is not None:
        names = "|".join(re.escape(n) for n in (str(path), Path(path).name))
        text = re.sub(rf"^(?:{names})(?: page \d+)?: ", "", text, count=1)
    return text or "unknown error"


def check_page(page: np.ndarray, where: str = "image") -> np.ndarray:
    """``page`` as ``(Y, X, C)``, or an ImageReadError naming ``where`` and what is wrong.

    Refuses what preprocessing cannot turn into model input: other numbers of dimensions and
    pages smaller than training accepts (:func:`~napari_microclf.core.images.shape_problem`).
    """
    page = np.asarray(page)
    if page.ndim == 2:
        page = page[..., None]
    if page.ndim != 3:
        raise ImageReadError(
            f"{where}: shape {page.shape} is not one image (Y, X) or "
            "(Y, X, C); give a stack's page axis"
        )
    if problem := shape_problem(page.shape):
        raise ImageReadError(f"{where}: {problem}; crop or remove it")
    return page


class Predictor:
    """A loaded bundle ready to classify pages.

    ``engine`` (``"auto"``, ``"openvino"``, ``"tensorflow"``) and ``precision`` (``"f32"``;
    on OpenVINO also ``"bf16"`` or ``"int8"``: faster, not the same numbers): see
    :mod:`.engine`. With OpenVINO and a bundle that carries its converted model, TensorFlow
    is never imported.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        batch_size: int = 32,
        *,
        engine: str | None = None,
        precision: str | None = None,
    ):
        from .engine import check_precision, resolve_engine

        self.engine = resolve_engine(engine)
        self.precision = check_precision(precision, self.engine)
        self.bundle = (
            bundle
            if isinstance(bundle, Bundle)
            else load_bundle(bundle, lazy=self.engine == "openvino")
        )
        self.class_names = self.bundle.class_names
        self.spec = self.bundle.preprocess
        self.batch_size = int(batch_size)
        self.prefetch = 1
        self._forward = None
        from .familiar import load_familiarity

        # None for bundles trained before it existed: their pages get no unfamiliar score
        self.familiarity = load_familiarity(self.bundle.path, self.bundle.meta)

    def _outputs(
        self, batch: np.ndarray, tta: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, with a familiarity description, unfamiliar scores (one pass).

        With ``tta`` the pass runs the batch's four flipped views (:func:`flip_views`, a
        batch of ``4 * len(batch)``) and the probabilities are their mean per page; the
        unfamiliar scores are those of the unflipped pages (the description was fitted on
        unflipped training images).
        """
        if self._forward is None and self.engine == "openvino":
            self._forward = self._openvino_forward()
        elif self._forward is None:
            import keras
            import tensorflow as tf

            from .familiar import FEATURE_LAYER

            model = self.bundle.model
            if self.familiarity is not None:  # the pooled features too, from the same pass
                model = keras.Model(
                    model.input, [model.output, model.get_layer(FEATURE_LAYER).output]
                )
            size = self.spec.image_size
            self._forward = tf.function(
                lambda x: model(x, training=False),
                reduce_retracing=True,
                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
            )
        n = len(batch)
        out = self._forward(flip_views(batch) if tta else batch)
        if self.engine == "openvino":  # always both outputs
            out = out if self.familiarity is not None else out[0]
        probs, feats = (out, None) if self.familiarity is None else out
        probs = np.asarray(probs)
        if tta:
            probs = mean_of_views(probs)
        if feats is None:
            return probs, None
        return probs, self.familiarity.scores(np.asarray(feats)[:n])

    def _openvino_forward(self):
        """The bundle's model compiled by OpenVINO: ``x`` -> ``(probabilities, features)``."""
        from .engine import OpenVinoRunner, bundle_ir
        from .familiar import FEATURE_LAYER

        bundle = self.bundle
        ov_model = bundle_ir(bundle.path, bundle.meta, lambda: bundle.model, (FEATURE_LAYER,))
        size, n = self.spec.image_size, len(self.class_names)
        shape = [
            d.get_length() if d.is_static else None for d in ov_model.inputs[0].get_partial_shape()
        ]
        classes = ov_model.outputs[0].get_partial_shape()[-1]
        if shape[1:] != [size, size, 3] or not classes.is_static or classes.get_length() != n:
            raise BundleError(
                f"the converted model of {bundle.source or bundle.path} takes {shape[1:]} and "
                f"predicts {classes} classes, but its {META_FILE} says {size}x{size}x3 and "
                f"{n} classes; retrain or restore the model folder"
            )
        if self.precision == "int8":
            ov_model = self._int8(ov_model)
        runner = OpenVinoRunner(ov_model, self.precision)
        return lambda x: runner(x)

    def _int8(self, ov_model):
        """The bundle's converted model quantized to int8, calibrated on up to
        :data:`~.engine.INT8_CALIBRATION` of its own training pages (cached: once per model)."""
        import hashlib

        from .engine import INT8_CALIBRATION, EngineError, cache_key, cached_ir, file_sha256
        from .evaluate import own_split
        from .images import PageRef, preprocess_refs
        from .model import MODEL_FILE

        bundle = self.bundle
        data_dir = Path(bundle.meta.get("data_dir", ""))
        keys = [e["key"] for e in (own_split(bundle.path) or {}).get("train", [])]
        step = max(len(keys) / INT8_CALIBRATION, 1.0)
        chosen = [keys[int(i * step)] for i in range(min(len(keys), INT8_CALIBRATION))]
        key = cache_key(
            kind="int8",
            model_sha256=file_sha256(bundle.path / MODEL_FILE),
            calibration=hashlib.sha1("\n".join(chosen).encode()).hexdigest(),
            outputs=[o.get_any_name() for o in ov_model.outputs],
        )

        def build():
            from .engine import quantize_int8

            found = [data_dir / k for k in chosen if (data_dir / k).is_file()]
            if not found:
                raise EngineError(
                    "precision int8 calibrates on the model's training images, and none of "
                    f"its {len(keys)} training files is under {data_dir}; use precision f32 "
                    "(or bf16), or put the dataset back where it was trained"
                )
            images = preprocess_refs([PageRef(p, 0, 0) for p in found], self.spec)
            return quantize_int8(ov_model, images)

        return cached_ir(key, build)

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self._outputs(batch)[0]

    def _result(self, probs: np.ndarray, file, page, score=None, tta=False) -> PagePrediction:
        i = int(probs.argmax())
        return PagePrediction(
            None if file is None else str(file),
            int(page),
            self.class_names[i],
            float(probs[i]),
            {n: float(p) for n, p in zip(self.class_names, probs, strict=True)},
            None if score is None else float(score),
            bool(tta),
        )

    def _prepare(self, array: np.ndarray, file, page) -> np.ndarray:
        """One page to model input; errors name the file and page."""
        where = "image" if file is None else str(file)
        if file is not None:
            where += f" page {page}" if page else ""
        elif page:
            where = f"page {page}"
        page_array = check_page(array, where)
        try:
            return preprocess(page_array, self.spec)
        except ImageReadError as exc:
            raise ImageReadError(f"{where}: {one_line(exc)}") from exc

    def _batches(self, entries):
        """``(file, page, model input)`` and FileError entries into batches: ``(buf, keys)``
        where keys lists ``(file, page)`` per row of ``buf`` and FileErrors where they came."""
        size = self.spec.image_size
        buf = np.empty((self.batch_size, size, size, 3), dtype=np.float32)
        keys: list = []
        n = 0
        for entry in entries:
            if isinstance(entry, FileError):
                keys.append(entry)
                continue
            file, page, x = entry
            buf[n] = x
            keys.append((file, page))
            n += 1
            if n == self.batch_size:
                yield buf, keys
                buf = np.empty_like(buf)  # the consumer still holds the last one
                keys, n = [], 0
        if keys:
            yield buf[:n], keys

    def _classify(self, entries, should_stop=None, tta: bool = False) -> Iterator[list]:
        """Batches of results (PagePrediction and FileError, in input order), one list per
        batch; entries are read and prepared in a background thread."""
        for buf, keys in _prefetch(self._batches(entries), self.prefetch):
            probs, scores = self._outputs(buf, tta) if len(buf) else (np.zeros((0, 0)), None)
            rows = iter(zip(probs, [None] * len(probs) if scores is None else scores, strict=True))
            out = []
            for k in keys:
                if isinstance(k, FileError):
                    out.append(k)
                else:
                    p, score = next(rows)
                    out.append(self._result(p, *k, score, tta))
            yield out
            if should_stop is not None and should_stop():
                return

    def predict_pages(
        self,
        pages: Iterable[tuple[object, int, np.ndarray]],
        should_stop=None,
        *,
        tta: bool = False,
    ) -> Iterator[PagePrediction]:
        """Classify ``(file, page, array)`` items, batching as they stream in.

        Pages are read and preprocessed in a background thread while the model works on the
        previous batch; at most ``prefetch`` + 2 batches exist at any time. An error raised
        by ``pages`` or by a page's preprocessing is raised here (naming file and page).

        ``tta=True`` (test-time augmentation): each page's probabilities are the mean of the
        model's outputs on the page and its horizontal, vertical and double flips, run as one
        batch of four times the pages (about four times the compute); the class and
        confidence follow from that mean. The unfamiliar score stays the unflipped page's.
        """
        entries = ((f, p, self._prepare(a, f, p)) for f, p, a in pages)
        for batch in self._classify(entries, should_stop, tta):
            yield from batch

    def predict_array(
        self,
        array: np.ndarray,
        page_axis: int | None = None,
        *,
        pages: bool = False,
        tta: bool = False,
    ) -> list[PagePrediction]:
        """Classify one image, or a stack along ``page_axis``; see :func:`predict`.

        ``pages=True`` is the older spelling of ``page_axis=0``; ``tta``: see
        :meth:`predict_pages`.
        """
        array = np.asarray(array)
        if pages and page_axis is None:
            page_axis = 0
        stack = array_pages(array, page_axis)
        if stack is None:
            return list(self.predict_pages([(None, 0, array)], tta=tta))
        return list(self.predict_pages(((None, i, a) for i, a in enumerate(stack)), tta=tta))

    def predict_file(
        self, path: str | Path, should_stop=None, *, tta: bool = False
    ) -> Iterator[PagePrediction]:
        """Every page of one file; an unreadable file or page raises ImageReadError.
        ``tta``: see :meth:`predict_pages`."""
        with open_image(path) as f:
            yield from self.predict_pages(
                ((path, i, f.page(i)) for i in range(len(f))), should_stop, tta=tta
            )

    def _file_entries(self, path: Path, start: int = 0, stop: int | None = None, *, name=None):
        """``(path, page, model input)`` per page, then a FileError if the file (or a page)
        cannot be read or prepared; the pages after a bad page are skipped.

        ``start``, ``stop``: only the pages ``start`` to ``stop - 1`` (``None``: to the end).
        ``name``: the file as results name it, where it is read under another (a cluster
        worker reads an absolute path; the CSV keeps the path the user gave).
        """
        shown = path if name is None else name
        page = None
        try:
            with open_image(path) as f:
                end = len(f) if stop is None else min(int(stop), len(f))
                for page in range(int(start), end):
                    yield (shown, page, self._prepare(f.page(page), shown, page))
        except _FILE_ERRORS as exc:
            message = one_line(exc, path)
            if name is not None:
                message = one_line(message, name)
            if not isinstance(exc, MicroclfError):  # a library's error: say which kind
                message = f"cannot be read ({type(exc).__name__}: {message})"
            if page and not message.startswith(f"page {page}"):  # a stack's later page
                message = f"page {page}: {message}"
            yield FileError(str(shown), message, page)

    def classify_paths(
        self, paths: Sequence[str | Path], should_stop=None, *, tta: bool = False
    ) -> Iterator[list[PagePrediction | FileError]]:
        """Every page of every file (folders searched recursively), past bad files.

        Yields one list per batch: a PagePrediction per classified page and a FileError
        where a file (or the rest of a stack) could not be read, in file order. ``tta``: see
        :meth:`predict_pages`.
        """

        def entries():
            for path in expand_paths(paths):
                yield from self._file_entries(path)

        yield from self._classify(entries(), should_stop, tta)

    def predict_paths(
        self, paths: Sequence[str | Path], should_stop=None, *, tta: bool = False
    ) -> Iterator[PagePrediction]:
        """Files and folders (searched recursively for images), in sorted order.

        Stops at the first unreadable file with its ImageReadError; :func:`predict_folder`
        classifies past bad files and reports them. ``tta``: see :meth:`predict_pages`.
        """
        for batch in self.classify_paths(paths, should_stop, tta=tta):
            for item in batch:
                if isinstance(item, FileError):
                    raise ImageReadError(str(item))
                yield item


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
    """Image files of ``paths`` (folders searched recursively, hidden ones skipped), sorted per
    folder; a path that does not exist raises ImageReadError."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and is_image_file(q)
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
        elif p.is_file():
            out.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or folder")
    return out


def find_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """:func:`expand_paths`, and an ImageReadError when there is no image at all."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = expand_paths(paths)
    if not files:
        raise ImageReadError(
            f"no images in {', '.join(str(p) for p in paths)} (looked for "
            f"{', '.join(IMAGE_SUFFIXES)} files); check the folder"
        )
    return files


def check_csv_destination(path: str | Path) -> Path:
    """``path`` if a CSV can be written there, else an OutputError saying what to do.

    Checked before any model is loaded: the path is not a folder, its folder exists and a file
    can be created in it (tried, not guessed from permission bits).
    """
    text = str(path).strip()
    if not text:
        raise OutputError("no CSV file name given; choose where to write the predictions")
    path = Path(text).expanduser()
    if path.is_dir():
        raise OutputError(
            f"CSV destination {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}"
        )
    folder = path.parent
    if not folder.exists():
        raise OutputError(
            f"cannot write {path}: the folder {folder} does not exist; create it "
            f"(mkdir -p {folder}) or choose another CSV path"
        )
    if not folder.is_dir():
        raise OutputError(
            f"cannot write {path}: {folder} is a file, not a folder; choose another CSV path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: no permission to create files in {folder} "
            f"({exc.strerror or exc}); choose a CSV path in a folder you can "
            "write to"
        ) from exc
    os.close(fd)
    os.unlink(probe)
    return path


def predict_folder(
    bundle,
    paths: str | Path | Sequence[str | Path],
    csv_path: str | Path | None = None,
    *,
    threshold: float = 0.0,
    batch_size: int = 32,
    should_stop: Callable[[], bool] | None = None,
    on_item: Callable[[PagePrediction | FileError], None] | None = None,
    tta: bool = False,
    client=None,
    resume: bool = False,
    chunk_pages: int | None = None,
    engine: str | None = None,
    precision: str | None = None,
) -> FolderResult:
    """Classify every page of every image under ``paths``, past files that cannot be read.

    Parameters
    ----------
    bundle : Predictor, Bundle, str or Path
        A loaded :class:`Predictor` or a model folder (loaded only after the checks below).
    paths : str, Path or sequence of them
        Folders (searched recursively; hidden files and folders skipped) and image files.
    csv_path : str or Path, optional
        Where to write the CSV (see :func:`write_csv`; with ``status`` and ``error`` columns).
        Its folder is checked before the model is loaded (:func:`check_csv_destination`).
        Rows are written to ``<csv_path>.partial`` as they come, flushed after each batch, and
        the file is renamed to ``csv_path`` when the run is complete: an earlier CSV of that
        name stays intact until then, and a stopped or failed run leaves its rows in the
        ``.partial`` file.
    threshold : float
        Confidence below which the CSV's class reads ``"uncertain"``.
    should_stop : callable, optional
        Checked after each batch; when true the run ends (``result.stopped``).
    on_item : callable, optional
        Called with each PagePrediction and FileError as it comes (progress, printing).
    tta : bool
        Test-time augmentation: each page's probabilities are the mean over the page and its
        three flips (one forward pass of four times the batch; about four times the compute).
        The unfamiliar score stays the unflipped page's. See :meth:`Predictor.predict_pages`.
    client : distributed.Client or str, optional
        Classify on a Dask cluster: a ``Client``, or a spec :func:`~napari_microclf.core.
        cluster.connect` accepts (``"local:N"``, ``"tcp://HOST:PORT"``; a cluster it starts
        is closed at the end). Files travel as ``(file, page range)`` references of about
        ``chunk_pages`` pages per task, never as pixels; each worker loads the bundle once
        (the model path must be readable there); results are written in input order as they
        complete, so the CSV is the one a single process writes, byte for byte. A worker that
        dies has its tasks run again by Dask (``distributed.scheduler.allowed-failures``).
    resume : bool
        Continue an interrupted run: the complete rows of ``<csv_path>.partial`` (from a
        single-process or a cluster run of the same model) are kept, a torn last line is
        dropped, and the pages and the failed files in it are not classified again. Needs
        ``csv_path``; without a ``.partial`` file the run starts afresh.
    chunk_pages : int, optional
        Pages per cluster task (default: ``batch_size``, one forward pass per task). TIFF
        stacks are split into page ranges (their page count is read from the header).
    engine, precision : str, optional
        The inference engine (``"auto"``, ``"openvino"``, ``"tensorflow"``) and precision
        (``"f32"``, or ``"bf16"`` on OpenVINO); see :mod:`.engine`. On a cluster, the
        workers'.

    Returns
    -------
    FolderResult
        The pages (a sequence of :class:`PagePrediction`), ``errors`` (one
        :class:`FileError` per file that could not be read, with its reason) and
        ``summary()``, one line saying what happened.

    Raises
    ------
    OutputError
        The CSV cannot be written there (before anything else is done); ``resume`` without
        ``csv_path``, or a ``.partial`` file written by a model with other classes.
    ImageReadError
        A path does not exist, or there is no image under ``paths``.
    ClusterError
        ``client`` is a spec that is malformed or names a scheduler that cannot be reached.

    Examples
    --------
    >>> result = predict_folder("model", "plates/", "plates.csv")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    Classified 118 pages from 38 of 40 files; 2 files could not be read (listed in the CSV's
    error column): a.tif: ...; b.png: .... CSV: plates.csv

    On a Dask cluster, continuing where an interrupted run stopped:

    >>> result = predict_folder(  # doctest: +SKIP
    ...     "model", "plates/", "plates.csv", client="tcp://10.0.0.5:8786", resume=True
    ... )
    """
    run = iter_folder(
        bundle,
        paths,
        csv_path,
        threshold=threshold,
        batch_size=batch_size,
        should_stop=should_stop,
        tta=tta,
        client=client,
        resume=resume,
        chunk_pages=chunk_pages,
        engine=engine,
        precision=precision,
    )
    try:
        while True:
            try:
                item = next(run)
            except StopIteration as end:
                return end.value
            if on_item is not None:
                on_item(item)
    finally:
        run.close()  # an error in on_item: the partial CSV is closed now, not when collected


def iter_folder(
    bundle,
    paths: str | Path | Sequence[str | Path],
    csv_path: str | Path | None = None,
    *,
    threshold: float = 0.0,
    batch_size: int = 32,
    should_stop: Callable[[], bool] | None = None,
    tta: bool = False,
    client=None,
    resume: bool = False,
    chunk_pages: int | None = None,
    engine: str | None = None,
    precision: str | None = None,
) -> Generator[PagePrediction | FileError, None, FolderResult]:
    """:func:`predict_folder` as a generator (for a GUI worker): yields each PagePrediction
    and FileError as it comes and returns the :class:`FolderResult`.

    Each batch's rows are in the CSV (flushed) before its items are yielded. The checks run
    at the first ``next()``; closing the generator early keeps the ``.partial`` CSV (and
    cancels a cluster's outstanding tasks). ``client``, ``resume``, ``chunk_pages``: see
    :func:`predict_folder`.
    """
    csv_path = check_csv_destination(csv_path) if csv_path is not None else None
    if resume and csv_path is None:
        raise OutputError(
            "resume needs the CSV of the interrupted run: give its path (--csv PATH), the "
            "one whose PATH.partial holds the rows so far"
        )
    files = find_images(paths)
    with contextlib.ExitStack() as stack:
        if client is not None:
            from .cluster import connected

            client = stack.enter_context(connected(client))
        if client is not None and not isinstance(bundle, Predictor):
            predictor = None  # the workers load the model; here only its columns are needed
            class_names, unfamiliar, source = _bundle_columns(bundle)
        else:
            predictor = (
                bundle
                if isinstance(bundle, Predictor)
                else Predictor(bundle, batch_size, engine=engine, precision=precision)
            )
            class_names = predictor.class_names
            unfamiliar = predictor.familiarity is not None
            source = predictor.bundle.source or predictor.bundle.path
        result = FolderResult(n_files=len(files))
        done: dict[str, set[int]] = {}
        failed: set[str] = set()
        out = None
        if csv_path:
            header = [csv_cell(v) for v in _header(class_names, status=True, unfamiliar=unfamiliar)]
            partial = csv_path.with_name(csv_path.name + ".partial")
            kept = _read_partial(partial, header) if resume else None
            if kept is not None:
                done, failed, result.resumed = kept
            out = _CsvStream(csv_path, class_names, threshold, unfamiliar, append=kept is not None)
        finished = False
        batches = None
        try:
            if client is not None:
                from .cluster import classify_on_cluster

                batches = classify_on_cluster(
                    client,
                    source,
                    files,
                    batch_size=batch_size,
                    tta=tta,
                    chunk_pages=chunk_pages or batch_size,
                    done=done,
                    failed=failed,
                    should_stop=should_stop,
                    engine=engine,
                    precision=precision,
                )
            elif done or failed:
                batches = predictor._classify(
                    _remaining_entries(predictor, files, done, failed), should_stop, tta
                )
            else:
                batches = predictor.classify_paths(files, should_stop, tta=tta)
            for batch in batches:
                if done:  # a page the interrupted run wrote is never written twice
                    batch = [i for i in batch if not _written(i, done)]
                for item in batch:
                    (result.errors if isinstance(item, FileError) else result.predictions).append(
                        item
                    )
                if out is not None:
                    out.write(batch)
                yield from batch
            result.stopped = should_stop is not None and should_stop()
            finished = not result.stopped
        finally:
            if batches is not None:
                batches.close()  # before the client closes: a cluster's tasks are cancelled
            if out is not None:
                result.csv_path = out.close(keep=finished)
    return result


def _bundle_columns(bundle) -> tuple[list[str], bool, Path]:
    """Class names, whether pages get an unfamiliar score, and the bundle's path (a zip as
    the zip), read from its metadata without loading the model (or TensorFlow)."""
    from .familiar import load_familiarity
    from .model import read_meta, resolve_bundle_path

    if isinstance(bundle, Bundle):
        return (
            bundle.class_names,
            load_familiarity(bundle.path, bundle.meta) is not None,
            (bundle.source or bundle.path),
        )
    source = Path(bundle).expanduser()
    meta = read_meta(source)
    folder = resolve_bundle_path(source)
    folder = folder.parent if folder.is_file() else folder
    return list(meta["class_names"]), load_familiarity(folder, meta) is not None, source


def _written(item: PagePrediction | FileError, done: dict[str, set[int]]) -> bool:
    if isinstance(item, FileError):
        return False
    return item.page in done.get(csv_cell(item.file or ""), ())


def resume_start(pages: set[int] | None) -> int:
    """The first page of a file still to classify: the interrupted run wrote pages in
    order, so its pages of the file are ``0 .. n - 1``."""
    n = 0
    while pages and n in pages:
        n += 1
    return n


def _remaining_entries(predictor, files, done, failed):
    """:meth:`Predictor._file_entries` of the pages an interrupted run did not write."""
    for path in files:
        key = csv_cell(str(path))
        if key in failed:
            continue
        yield from predictor._file_entries(path, resume_start(done.get(key)))


def _read_partial(partial: Path, header: list[str]) -> tuple[dict, set, int] | None:
    """What an interrupted run wrote to ``partial``: ``(done, failed, rows)``, with ``done``
    the pages written per file (as the CSV's file cell) and ``failed`` the files with an
    error row; None when there is no such file or not even its header.

    A torn last line (the run killed mid-write) is cut off the file, so rows appended next
    start on a line of their own. A header other than ``header`` (another model's classes)
    raises an OutputError.
    """
    try:
        data = partial.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(
            f"cannot read {partial} to resume ({exc.strerror or exc}); check the file, or run "
            "without resume to start afresh"
        ) from exc
    end = data.rfind(b"\n") + 1  # rows end with \r\n: what follows the last one is torn
    if end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(end)
    rows = list(csv.reader(io.StringIO(data[:end].decode("utf-8", errors="replace"))))
    if not rows:
        return None
    if rows[0] != header:
        raise OutputError(
            f"{partial} has the columns {', '.join(rows[0])}, not this model's "
            f"({', '.join(header)}): it was written by another model; remove it or run "
            "without resume"
        )
    done: dict[str, set[int]] = {}
    failed: set[str] = set()
    status = header.index("status")
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        if row[status] == "error":
            failed.add(row[0])
        elif row[1].isdigit():
            done.setdefault(row[0], set()).add(int(row[1]))
    return done, failed, len(rows) - 1


class _CsvStream:
    """Rows written to ``<path>.partial`` as they come; renamed to ``path`` on completion."""

    def __init__(
        self,
        path: Path,
        class_names: Sequence[str],
        threshold: float,
        unfamiliar: bool = False,
        append: bool = False,
    ):
        """``append``: add to an existing ``.partial`` file (its header written already)."""
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.class_names = list(class_names)
        self.threshold = threshold
        self.unfamiliar = unfamiliar  # the model scores familiarity: the `unfamiliar` column
        try:
            self.file = open(  # noqa: SIM115
                self.partial, "a" if append else "w", encoding="utf-8", newline=""
            )
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.partial} ({exc.strerror or exc}); choose another CSV path"
            ) from exc
        self.writer = csv.writer(self.file)
        if append:
            return
        self.writer.writerow(
            [
                csv_cell(v)
                for v in _header(self.class_names, status=True, unfamiliar=self.unfamiliar)
            ]
        )

    def write(self, items: Iterable[PagePrediction | FileError]) -> None:
        """Write the rows of ``items`` and flush them to disk."""
        for item in items:
            row = _row(
                item, self.class_names, self.threshold, status=True, unfamiliar=self.unfamiliar
            )
            self.writer.writerow([csv_cell(v) for v in row])
        self.file.flush()

    def close(self, keep: bool) -> Path:
        """Close; ``keep`` (a complete run) renames the partial file to the CSV's name."""
        self.file.close()
        if keep:
            os.replace(self.partial, self.path)
            return self.path
        return self.partial


def predict(
    bundle,
    image_or_path,
    batch_size: int = 32,
    *,
    page_axis: int | None = None,
    tta: bool = False,
    client=None,
    engine: str | None = None,
    precision: str | None = None,
):
    """Classify an image array, a stack array, an image file, a folder or a list of paths.

    Parameters
    ----------
    bundle : Predictor, Bundle, str or Path
        A model folder written by training (or a loaded bundle or Predictor).
    image_or_path : numpy.ndarray, str, Path or sequence of paths
        An array: with ``page_axis=None`` one image, ``(Y, X)`` or ``(Y, X, C)`` with
        ``C <= 4``; with ``page_axis`` a stack whose pages lie along that axis (each page
        ``(Y, X)`` or ``(Y, X, C)``). A file: every page of it (a TIFF stack page by page).
        A folder or several paths: every page of every image, past files that cannot be read
        (see :func:`predict_folder`).
    batch_size : int
        Pages per forward pass.
    page_axis : int, optional
        For arrays only: the axis that enumerates pages. Nothing is guessed: a
        ``(10, 64, 64)`` array without ``page_axis`` is refused, not taken as 10 pages.
    tta : bool
        Test-time augmentation: average each page's probabilities over the page and its
        horizontal, vertical and double flips (about four times the compute; the unfamiliar
        score stays the unflipped page's). See :meth:`Predictor.predict_pages`.
    client : distributed.Client or str, optional
        For files and folders: classify on a Dask cluster (a ``Client``, ``"local:N"`` or
        ``"tcp://HOST:PORT"``; see :func:`predict_folder`). Arrays are classified here.
        To write a CSV and resume an interrupted run, use :func:`predict_folder`.
    engine, precision : str, optional
        The inference engine and its precision: see :class:`Predictor`.

    Returns
    -------
    list of PagePrediction or FolderResult
        One :class:`PagePrediction` per page (``page`` counts along ``page_axis``). For a
        folder or several paths a :class:`FolderResult`: the same sequence of pages, plus
        ``errors``, the files that could not be read.

    Raises
    ------
    ImageReadError
        An array that is not one image without ``page_axis``; a single file that cannot be
        read or whose page is too small (the message names the file and the minimum side).

    Examples
    --------
    >>> stack = np.random.rand(5, 64, 64)               # 5 gray pages  # doctest: +SKIP
    >>> pages = predict("model", stack, page_axis=0)    # doctest: +SKIP
    >>> [(p.page, p.class_name) for p in pages]          # doctest: +SKIP
    [(0, 'round'), (1, 'round'), (2, 'fragmented'), (3, 'round'), (4, 'elongated')]
    >>> predict("model", np.random.rand(64, 64, 3))[0].confidence  # one RGB page  # doctest: +SKIP
    0.93
    >>> predict("model", "plates/", client="local:4").summary()  # doctest: +SKIP
    'Classified 960 pages from 40 files'
    """
    predictor = bundle if isinstance(bundle, Predictor) else None
    if isinstance(image_or_path, np.ndarray):
        predictor = predictor or Predictor(bundle, batch_size, engine=engine, precision=precision)
        return predictor.predict_array(image_or_path, page_axis, tta=tta)
    if page_axis is not None:
        raise TypeError("page_axis is for arrays; a file's pages come from its own axes")
    if isinstance(image_or_path, (str, Path)) and Path(image_or_path).expanduser().is_file():
        path = Path(image_or_path).expanduser()
        if client is None:
            predictor = predictor or Predictor(
                bundle, batch_size, engine=engine, precision=precision
            )
            return list(predictor.predict_file(path, tta=tta))
        result = predict_folder(
            predictor or bundle,
            path,
            batch_size=batch_size,
            tta=tta,
            client=client,
            engine=engine,
            precision=precision,
        )
        if result.errors:  # as a single file in one process: its error, not a part of it
            raise ImageReadError(str(result.errors[0]))
        return list(result.predictions)
    return predict_folder(
        predictor or bundle,
        image_or_path,
        batch_size=batch_size,
        tta=tta,
        client=client,
        engine=engine,
        precision=precision,
    )


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


def _header(class_names: Sequence[str], status: bool, unfamiliar: bool = False) -> list[str]:
    return [
        "file",
        "page",
        "class",
        "confidence",
        *class_names,
        *(["unfamiliar"] if unfamiliar else []),
        *(["status", "error"] if status else []),
    ]


def _row(
    item: PagePrediction | FileError,
    class_names: Sequence[str],
    threshold: float,
    status: bool,
    unfamiliar: bool = False,
) -> list:
    if isinstance(item, FileError):
        if not status:
            raise ValueError(
                f"{item}: a FileError needs the status and error columns (status=True)"
            )
        return [
            item.path,
            "" if item.page is None else item.page,
            "",
            "",
            *("" for _ in class_names),
            *([""] if unfamiliar else []),
            "error",
            item.message,
        ]
    score = item.unfamiliar_score
    return [
        item.file or "",
        item.page,
        item.label(threshold),
        f"{item.confidence:.4f}",
        *(f"{item.probabilities[c]:.4f}" for c in class_names),
        *([("" if score is None else f"{score:.4f}")] if unfamiliar else []),
        *(["ok", ""] if status else []),
    ]


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


def write_csv(
    predictions: Iterable[PagePrediction | FileError],
    path: str | Path,
    class_names: Sequence[str],
    threshold: float = 0.0,
    *,
    status: bool | None = None,
    unfamiliar: bool | None = None,
) -> int:
    """CSV with file, page, class, confidence and one probability column per class.

    With ``unfamiliar`` (the default when a prediction has an ``unfamiliar_score``, i.e. the
    model has a familiarity description) a column ``unfamiliar`` after the probabilities
    holds the score (above 1: unlike the training images; the class then reads
    ``unfamiliar``); empty for pages without a score.

    With ``status`` (the default when ``predictions`` is a :class:`FolderResult` or holds a
    :class:`FileError`) two more columns: ``status`` (``ok`` or ``error``) and ``error`` (the
    reason, one line); a FileError becomes a row with empty class and probabilities. A
    FolderResult writes its pages, then its errors.

    UTF-8 with ``\\r\\n`` line ends on every platform; text cells that start like a formula
    (``=``, ``+``, ``-``, ``@``, tab, CR: class names come from folder names, file names from
    users) are written with a leading ``'`` (see :func:`csv_cell`). Written to a temporary
    file and renamed, so a failure leaves an earlier CSV intact. Returns the row count.
    """
    if isinstance(predictions, FolderResult):
        items: list = [*predictions.predictions, *predictions.errors]
        status = True if status is None else status
    else:
        items = list(predictions)
    if status is None:
        status = any(isinstance(i, FileError) for i in items)
    if unfamiliar is None:
        unfamiliar = any(getattr(i, "unfamiliar_score", None) is not None for i in items)

    def rows():
        yield _header(class_names, status, unfamiliar)
        for item in items:
            yield _row(item, class_names, threshold, status, unfamiliar)

    return _write_csv_rows(path, rows())
