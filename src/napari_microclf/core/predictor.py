"""The predictor: a loaded bundle that classifies pages.

A :class:`Predictor` loads the model once and traces its forward pass once; pages of a
stack are streamed in batches, so memory is bounded by the batch, not the stack. Each page
gives a :class:`~.results.PagePrediction` (class, confidence, all probabilities, unfamiliar
score); a file that cannot be read gives a :class:`~.results.FileError` where it came.

Test-time augmentation (``tta=True``) classifies each page as itself and its three flips
(:func:`~.tta.flip_views`) in one forward pass and averages the four probability vectors.

Folders into a CSV, resuming and clusters are :mod:`.folder_runs`'; the one entry point for
arrays, files and folders is :func:`~.predict.predict`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .bundle import (
    META_FILE,
    MODEL_FILE,
    Bundle,
    load_bundle,
    model_changed,
    model_sha256,
    own_split,
)
from .engine import (
    INT8_CALIBRATION,
    EngineError,
    OpenVinoRunner,
    bundle_ir,
    cache_key,
    cached_ir,
    check_precision,
    quantize_int8,
    resolve_engine,
)
from .errors import BundleError, MicroclfError, one_line
from .familiar import load_familiarity
from .images import (
    ImageReadError,
    PageRef,
    array_pages,
    expand_paths,
    open_image,
    preprocess,
    preprocess_refs,
    shape_problem,
)
from .model import FEATURE_LAYER
from .predict_options import PredictOptions, options_of
from .results import FileError, PagePrediction
from .tta import flip_views, mean_of_views

# What a bad file may raise while it is read and preprocessed: ours (ImageReadError, ...) and
# the builtin errors of decoders that get past ImageFile's wrapping. Anything else is a bug
# and stops the run with its traceback.
_FILE_ERRORS = (MicroclfError, OSError, ValueError, IndexError, MemoryError)


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

    ``options`` (:class:`~.predict_options.PredictOptions`; the keywords ``batch_size``,
    ``engine`` and ``precision`` override it): its batch size, engine (``"auto"``,
    ``"openvino"``, ``"tensorflow"``) and precision (``"f32"``; on OpenVINO also ``"bf16"`` or
    ``"int8"``: faster, not the same numbers, see :mod:`.engine`), and its ``tta`` the default
    of the methods' ``tta``. With OpenVINO and a bundle that carries its converted model,
    TensorFlow is never imported.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        batch_size: int | None = None,
        *,
        engine: str | None = None,
        precision: str | None = None,
        options: PredictOptions | None = None,
    ):
        self.options = options_of(
            options, batch_size=batch_size, engine=engine, precision=precision
        )
        self.engine = resolve_engine(self.options.engine)
        self.precision = check_precision(self.options.precision, self.engine)
        self.bundle = (
            bundle
            if isinstance(bundle, Bundle)
            else load_bundle(bundle, lazy=self.engine == "openvino")
        )
        self.class_names = self.bundle.class_names
        self.spec = self.bundle.preprocess
        self.batch_size = int(self.options.batch_size)
        self.prefetch = 1
        self._forward = None
        # None for bundles trained before it existed: their pages get no unfamiliar score
        self.familiarity = load_familiarity(self.bundle.path, self.bundle.meta)
        if model_changed(self.bundle.path, self.bundle.meta):
            shown = self.bundle.source or self.bundle.path
            warnings.warn(
                f"{MODEL_FILE} in {shown} is not the file this model folder was written with "
                f"(its SHA-256 differs from {META_FILE}'s): it predicts as it is (its OpenVINO "
                "copy is made again from it), without unfamiliar scores, and the folder's test "
                "report does not describe it; retrain, or restore the previous model",
                stacklevel=2,
            )
            self.familiarity = None

    def _outputs(
        self, batch: np.ndarray, tta: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, with a familiarity description, unfamiliar scores (one pass).

        With ``tta`` the pass runs the batch's four flipped views (:func:`~.tta.flip_views`, a
        batch of ``4 * len(batch)``) and the probabilities are their mean per page; the
        unfamiliar scores are those of the unflipped pages (the description was fitted on
        unflipped training images).
        """
        if self._forward is None and self.engine == "openvino":
            self._forward = self._openvino_forward()
        elif self._forward is None:
            import keras
            import tensorflow as tf

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
        bundle = self.bundle
        data_dir = Path(bundle.meta.get("data_dir", ""))
        keys = [e["key"] for e in (own_split(bundle.path) or {}).get("train", [])]
        step = max(len(keys) / INT8_CALIBRATION, 1.0)
        chosen = [keys[int(i * step)] for i in range(min(len(keys), INT8_CALIBRATION))]
        key = cache_key(
            kind="int8",
            model_sha256=model_sha256(bundle.path),
            calibration=hashlib.sha1("\n".join(chosen).encode()).hexdigest(),
            outputs=[o.get_any_name() for o in ov_model.outputs],
        )

        def build():
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

    def _classify(self, entries, should_stop=None, tta: bool | None = None) -> Iterator[list]:
        """Batches of results (PagePrediction and FileError, in input order), one list per
        batch; entries are read and prepared in a background thread. ``tta`` None: the
        predictor's ``options.tta``."""
        tta = self.options.tta if tta is None else bool(tta)
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
        tta: bool | None = None,
    ) -> Iterator[PagePrediction]:
        """Classify ``(file, page, array)`` items, batching as they stream in.

        Pages are read and preprocessed in a background thread while the model works on the
        previous batch; at most ``prefetch`` + 2 batches exist at any time. An error raised
        by ``pages`` or by a page's preprocessing is raised here (naming file and page).

        ``tta=True`` (test-time augmentation): each page's probabilities are the mean of the
        model's outputs on the page and its horizontal, vertical and double flips, run as one
        batch of four times the pages (about four times the compute); the class and
        confidence follow from that mean. The unfamiliar score stays the unflipped page's.
        ``tta=None``: the predictor's ``options.tta`` (off by default).
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
        tta: bool | None = None,
    ) -> list[PagePrediction]:
        """Classify one image, or a stack along ``page_axis``; see :func:`~.predict.predict`.

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
        self, path: str | Path, should_stop=None, *, tta: bool | None = None
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
        self, paths: Sequence[str | Path], should_stop=None, *, tta: bool | None = None
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
        self, paths: Sequence[str | Path], should_stop=None, *, tta: bool | None = None
    ) -> Iterator[PagePrediction]:
        """Files and folders (searched recursively for images), in sorted order.

        Stops at the first unreadable file with its ImageReadError;
        :func:`~.folder_runs.predict_folder` classifies past bad files and reports them.
        ``tta``: see :meth:`predict_pages`.
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
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
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
