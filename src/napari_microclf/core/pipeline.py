"""Training pages streamed from their files: memory bounded by a few batches, not the dataset.

Fine-tuning (and training with the feature cache off) runs the whole model on the images in
every epoch. Decoding the whole dataset into memory first, and copying it again into a
``tf.data`` pipeline, costs about 1.2 MB per 224 px page, so 10,000 pages would need 12 GB
before the first step. A :class:`PageSource` keeps only the page *references*: each epoch
draws a new order of the page indices (8 bytes a page, so the shuffle is over the whole set,
as before, at no memory cost) and a parallel map reads and normalises the pages of the next
batches while the model works on this one. The order comes from the seed and the epoch
alone (:class:`EpochOrder`), so one device or several see the same batches, and
augmentation stays inside the model (its Random* layers), as before.

Decoding a page costs a few milliseconds (reading, percentile normalisation, resizing).
Small datasets should not pay that every epoch, so the pages decoded in the first epoch are
kept while they fit a memory budget (:class:`PageMemo`: ``$MICROCLF_PAGE_MEMORY_MB``, by
default an eighth of the available memory and at most 1 GiB); the pages beyond it are read
again each epoch. Memory stays bounded by the budget and a few batches.

Evaluation, familiarity and test-time augmentation read the pages in chunks
(:meth:`PageSource.chunks`), also without holding a subset in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import settings
from .device import available_memory
from .images import ImageReadError, PageRef, PreprocessSpec, open_image, preprocess, preprocess_refs

CHUNK_BATCHES = 8  # pages read at once for inference: this many batches
PAGE_MEMORY_MAX = 1 << 30  # decoded pages kept between epochs: at most this many bytes
PAGE_MEMORY_FRACTION = 8  # ... and at most this fraction of the available memory


def page_memory_budget() -> int:
    """Bytes of decoded pages a training keeps between epochs: ``$MICROCLF_PAGE_MEMORY_MB``
    when set (0 streams every page every epoch), else ``min(1 GiB, available / 8)``."""
    memory_mb = settings.page_memory_mb()
    if memory_mb is not None:
        return max(int(memory_mb * 2**20), 0)
    available = available_memory()
    if available is None:
        return PAGE_MEMORY_MAX // 4
    return int(min(PAGE_MEMORY_MAX, available // PAGE_MEMORY_FRACTION))


class PageMemo:
    """Decoded pages kept up to ``budget`` bytes (first come, first kept; never evicted, so
    each epoch reads the same pages from memory and the rest from their files)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._pages: dict = {}
        self._lock = threading.Lock()

    def get(self, key) -> np.ndarray | None:
        return self._pages.get(key)

    def put(self, key, page: np.ndarray) -> None:
        with self._lock:
            if key not in self._pages and self.used + page.nbytes <= self.budget:
                self._pages[key] = page
                self.used += page.nbytes

    def __len__(self) -> int:
        return len(self._pages)


class EpochOrder:
    """The order of ``range(n)`` in epoch :attr:`epoch`, drawn from ``(seed, epoch)``.

    Training sets :attr:`epoch` at the start of each epoch (:meth:`callback`), so the order
    depends on the seed and the epoch alone: the same batches on one device or several
    (tf.data's own shuffle is seeded anew once a strategy distributes the dataset, and a
    distributed dataset is iterated once more before the first epoch).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def __call__(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.permutation(self.n).astype(np.int64)

    def callback(self):
        """A Keras callback that sets :attr:`epoch` when each epoch begins."""
        import keras

        def begin(epoch, logs=None):
            self.epoch = int(epoch)

        return keras.callbacks.LambdaCallback(on_epoch_begin=begin)


def indices(n: int, order: EpochOrder | None = None, limit: int | None = None):
    """``tf.data`` indices ``0..n-1``, in the ``order`` of the current epoch if given; with
    ``limit`` only the first ``limit`` of them (of each epoch's order)."""
    import tensorflow as tf

    if limit is not None and limit < n:
        return indices(n, order).take(limit)
    if order is None:
        return tf.data.Dataset.range(n)

    def epoch(_):
        perm = tf.numpy_function(order, [], tf.int64, stateful=True)
        perm.set_shape([n])
        return tf.data.Dataset.from_tensor_slices(perm)

    # flat_map hides the length: say it, so Keras knows the steps of an epoch
    return (
        tf.data.Dataset.range(1).flat_map(epoch).apply(tf.data.experimental.assert_cardinality(n))
    )


class PageSource:
    """The pages of one subset, read from their files when a pipeline asks for them.

    Parameters
    ----------
    refs : sequence of PageRef
        The pages (file, page, label), in the subset's order.
    spec : PreprocessSpec
        How a page becomes model input (size, normalisation, channels).
    """

    def __init__(self, refs: Sequence[PageRef], spec: PreprocessSpec, memo: PageMemo | None = None):
        self.refs = list(refs)
        self.spec = spec
        self.memo = memo  # decoded pages kept between epochs (shared by a training's subsets)
        self.failure: ImageReadError | None = None  # the first page that could not be read
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """What the decoded subset would be: ``(pages, size, size, 3)``."""
        s = self.spec.image_size
        return (len(self.refs), s, s, 3)

    def read(self, i: int) -> np.ndarray:
        """Page ``i`` as model input (float32 ``(size, size, 3)``), from the memo or its file."""
        ref = self.refs[int(i)]
        key = (str(ref.path), ref.page)
        page = self.memo.get(key) if self.memo is not None else None
        if page is None:
            page = self.decode(int(i))
            if self.memo is not None:
                self.memo.put(key, page)
        return page

    def decode(self, i: int) -> np.ndarray:
        """Page ``i`` read from its file and preprocessed; errors name the file."""
        ref = self.refs[int(i)]
        try:
            with open_image(ref.path) as f:
                return preprocess(f.page(ref.page), self.spec)
        except (ImageReadError, OSError, ValueError) as exc:
            msg = str(exc)
            where = f"{ref.path}" + (f" page {ref.page}" if ref.page else "")
            error = ImageReadError(
                (msg if str(ref.path) in msg else f"{where}: {msg}")
                + " (it was readable when the training started; was it changed or moved?)"
            )
            with self._lock:
                self.failure = self.failure or error
            raise error from exc

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The pages in order, ``size`` at a time; the next chunk is read while this one is
        used (at most two chunks in memory)."""
        size = max(int(size), 1)
        starts = range(0, len(self.refs), size)
        with ThreadPoolExecutor(max_workers=1) as pool:
            load = lambda s: preprocess_refs(self.refs[s : s + size], self.spec)  # noqa: E731
            pending = pool.submit(load, starts[0]) if starts else None
            for k in range(len(starts)):
                chunk = pending.result()
                pending = pool.submit(load, starts[k + 1]) if k + 1 < len(starts) else None
                yield chunk

    def dataset(
        self,
        batch_size: int,
        labels: np.ndarray | None = None,
        order: EpochOrder | None = None,
        limit: int | None = None,
    ):
        """A ``tf.data.Dataset`` of batches of pages (and labels, if given).

        With ``order`` the pages come in that :class:`EpochOrder` (a new one each epoch, over
        the whole subset: the indices are shuffled, not the pixels); pages are read by a
        parallel map, ``deterministic`` so the order is kept, and prefetched. ``limit``: only
        the first pages of that order (see :func:`indices`).
        """
        import tensorflow as tf

        n = len(self.refs)
        s = self.spec.image_size
        autotune = tf.data.AUTOTUNE
        ds = indices(n, order, limit)

        def read(i):
            return self.read(int(i))

        def load(i):
            x = tf.numpy_function(read, [i], tf.float32, stateful=False)
            x.set_shape((s, s, 3))
            return x

        if labels is None:
            ds = ds.map(load, num_parallel_calls=autotune, deterministic=True)
        else:
            y = tf.constant(np.asarray(labels))
            ds = ds.map(
                lambda i: (load(i), tf.gather(y, i)),
                num_parallel_calls=autotune,
                deterministic=True,
            )
        return ds.batch(batch_size).prefetch(autotune)


def gather_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    order: EpochOrder | None = None,
    pick_view_seed: int | None = None,
    limit: int | None = None,
):
    """Batches of rows of ``features`` (an array or a memory-mapped ``.npy``) by index.

    The rows of each batch are gathered from ``features`` only when the batch is needed,
    so a memory-mapped array is never read whole. With ``pick_view_seed`` the features are
    ``(N, views, D)`` and each row of a batch takes one view drawn at random (a training
    epoch sees one of the cached augmented views of every image). ``limit``: only the first
    rows of each epoch's order (see :func:`indices`).
    """
    import tensorflow as tf

    n = len(labels)
    shape = features.shape[1:]
    dtype = tf.as_dtype(features.dtype)
    ds = indices(n, order, limit).batch(batch_size)
    y = tf.constant(np.asarray(labels))

    def rows(idx):
        order = np.argsort(idx)  # ascending reads from a memory-mapped file
        out = np.empty((len(idx), *shape), features.dtype)
        out[order] = features[idx[order]]
        return out

    def take(idx):
        x = tf.numpy_function(rows, [idx], dtype, stateful=False)
        x.set_shape((None, *shape))
        return tf.cast(x, tf.float32), tf.gather(y, idx)  # float16 activations are stored

    ds = ds.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pick_view_seed is not None:
        n_views = shape[0]
        gen = tf.random.Generator.from_seed(pick_view_seed)

        def pick(x, label):
            view = gen.uniform(tf.shape(label), 0, n_views, tf.int32)
            return tf.gather(x, view, axis=1, batch_dims=1), label

        ds = ds.map(pick)
    return ds.prefetch(tf.data.AUTOTUNE)
