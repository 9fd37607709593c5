"""Cached backbone features: the frozen EfficientNetB0 runs once per image, not once per epoch.

With a frozen base the classifier is ``head(backbone(augment(image)))`` and only the head
learns, so the backbone's output (the 1280 pooled features) can be computed once for each
training image and for ``K`` augmented views of it, and once for each validation and test
image. Each epoch then trains the head on one randomly chosen view per image.

The cache lives in the dataset, in ``.microclf-cache/<key>/``, one ``.npy`` per file
content hash holding ``(pages, views, features)``. ``key`` hashes everything that changes
the features (:func:`cache_key`): the backbone and the *content* of its weights (the
ImageNet file included), :data:`FEATURES_VERSION` of our preprocessing and augmentation
code, the TensorFlow and Keras versions, the preprocessing (image size, normalisation,
channel map, resize), the augmentation strength and the seed of the augmented views. A
changed setting or an upgrade therefore never reuses stale features, an edited file gets new
ones (its content hash changes), and a retraining computes only what is new. Each key folder
has a ``key.json`` saying what it was made with and a ``last-used`` stamp; folders unused for
30 days, or beyond the size cap (``$MICROCLF_CACHE_MAX_GB``, 10 GB), are pruned
(:func:`prune_cache`); ``microclf cache info|clear DATA`` shows or empties the cache.

A large set's assembled ``(N, views, D)`` features (above :func:`memmap_threshold_bytes`,
256 MB unless ``$MICROCLF_MEMMAP_MB`` says otherwise) are written once into the key folder
as ``assembled-<hash>.npy`` and returned as a read-only ``np.memmap`` of it, so a training
on 100,000 images holds them on disk, not twice in memory; the per-file entries are read
memory-mapped, one file at a time, while assembling. :mod:`.features_cluster` computes the
entries on a Dask cluster (``microclf features DATA --cluster ...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import settings
from .engine import OpenVinoRunner, backbone_ir, engine_label
from .errors import OutputError
from .files import file_digest, mkstemp_for_user
from .images import PageRef, PreprocessSpec, preprocess_refs

CACHE_DIR = ".microclf-cache"
DEFAULT_VIEWS = 4  # augmented views per training image; see docs/performance.md
# Bump on any change to preprocessing (images.preprocess and what it calls) or to the
# augmentation (make_augment) that alters features: cached features of older code are then
# never reused. tests/test_features.py pins the features of a fixed image to this number.
# 2: sparse images fall back to min-max normalisation; fixed-intensity mode.
# 3: a non-square page is resized before it is padded (not padded, then resized).
FEATURES_VERSION = 3
MAX_AGE_DAYS = 30
KEY_FILE, STAMP_FILE = "key.json", "last-used"
ASSEMBLED_PREFIX = "assembled-"  # an assembled set's file in a key folder (not an entry)
ASSEMBLED_KEEP = 3  # assembled files kept per key folder (a training's train, val and test)


def key_fields(
    spec: PreprocessSpec,
    weights_id: str,
    seed: int,
    augment_strength: float | None,
    engine: str = "tensorflow",
) -> dict:
    """What the cached features depend on; ``weights_id`` from ``model.weights_identity``,
    ``engine`` the resolved engine (``"openvino"`` or ``"tensorflow"``: its version and
    precision are part of the key, so features of another engine are never mixed in)."""
    import keras
    import tensorflow as tf

    return {
        "features_version": FEATURES_VERSION,
        "weights": weights_id,
        "spec": spec.to_dict(),
        "augment": augment_strength,
        "views_seed": seed if augment_strength is not None else None,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "engine": engine_label(engine, "f32"),
    }


def cache_key(
    spec: PreprocessSpec,
    weights_id: str,
    seed: int,
    augment_strength: float | None,
    engine: str = "tensorflow",
) -> str:
    fields = key_fields(spec, weights_id, seed, augment_strength, engine)
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cache_max_bytes() -> int:
    return int(settings.cache_max_gb() * 2**30)


def memmap_threshold_bytes() -> int:
    """Assembled features above this many bytes come back memory-mapped from the cache
    (``$MICROCLF_MEMMAP_MB``, default 256; 0 maps every set)."""
    return int(settings.memmap_mb() * 2**20)


def _is_entry(path: Path) -> bool:
    """A per-file cache entry (``<sha1>.npy``), not an assembled set or a temporary."""
    return path.suffix == ".npy" and not path.name.startswith((ASSEMBLED_PREFIX, "."))


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, symbolic links neither followed nor counted."""
    total = 0
    for top, _dirs, names in os.walk(folder):  # followlinks=False
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _last_used(folder: Path) -> float:
    stamp = folder / STAMP_FILE
    return (stamp if stamp.exists() else folder).stat().st_mtime


def _linked_cache(root: str | Path) -> Path | None:
    """``root``'s cache folder when it is a symbolic link (to scratch space, or shipped with
    a downloaded dataset), else None. Features are read and written through it; nothing is
    ever deleted through it."""
    base = Path(root) / CACHE_DIR
    return base if base.is_symlink() else None


_KEY_NAME = re.compile(r"[0-9a-f]{16}")  # what cache_key gives


def _own_folders(base: Path) -> list[Path]:
    """The key folders microclf made in the cache folder ``base``: real folders (never a
    symbolic link) named as :func:`cache_key` names them or marked with ``key.json`` or
    ``last-used``. Anything else there is not ours and is never listed, pruned or cleared."""
    if not base.is_dir() or base.is_symlink():
        return []
    out = []
    for entry in os.scandir(base):
        if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
            continue
        folder = Path(entry.path)
        marked = (folder / KEY_FILE).is_file() or (folder / STAMP_FILE).is_file()
        if marked or _KEY_NAME.fullmatch(entry.name):
            out.append(folder)
    return sorted(out)


def cache_entries(root: str | Path) -> list[dict]:
    """The cache folders of a dataset, most recently used first, with what made them."""
    base = Path(root) / CACHE_DIR
    if base.is_symlink():  # listed through the link (read-only), never cleaned through it
        base = base.resolve()
    out = []
    for folder in _own_folders(base):
        try:
            fields = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            fields = {}
        out.append(
            {
                "key": folder.name,
                "folder": folder,
                "fields": fields,
                "files": sum(1 for p in folder.glob("*.npy") if _is_entry(p)),
                "bytes": _folder_bytes(folder),
                "last_used": _last_used(folder),
            }
        )
    return sorted(out, key=lambda e: -e["last_used"])


STALE_TMP_S = 600  # a cache entry is written in well under a second: older temporaries are a
# killed run's leftovers, never another running training's file


def remove_stale_temporaries(root: str | Path, min_age_s: float = STALE_TMP_S) -> int:
    """Remove half-written cache files (``.tmp-*``) that killed runs left in ``root``'s cache.

    Returns how many were removed. Every training calls it, cached or not; a cache folder
    that is a symbolic link is left alone (:func:`_own_folders` finds none in it)."""
    now, n = time.time(), 0
    for folder in _own_folders(Path(root) / CACHE_DIR):
        for tmp in folder.glob(".tmp-*"):
            try:
                if not tmp.is_symlink() and now - tmp.stat().st_mtime > min_age_s:
                    tmp.unlink()
                    n += 1
            except OSError:  # gone meanwhile, or a read-only dataset: nothing to clean there
                continue
    return n


def prune_cache(
    root: str | Path,
    keep: str | None = None,
    max_age_days: float = MAX_AGE_DAYS,
    max_bytes: int | None = None,
) -> list[str]:
    """Remove cache folders unused for ``max_age_days`` and, oldest first, those beyond
    ``max_bytes`` (never ``keep``, the one in use), and temporary files of killed runs.
    Returns the removed keys. Only key folders microclf made are removed, and nothing when
    the cache folder is a symbolic link (its target is not ours to clean)."""
    if _linked_cache(root):
        return []
    max_bytes = cache_max_bytes() if max_bytes is None else max_bytes
    remove_stale_temporaries(root)
    now, removed, total = time.time(), [], 0
    for entry in cache_entries(root):
        if entry["key"] == keep:
            total += entry["bytes"]
            continue
        too_old = now - entry["last_used"] > max_age_days * 86400
        if too_old or total + entry["bytes"] > max_bytes:
            shutil.rmtree(entry["folder"], ignore_errors=True)  # never follows links inside
            removed.append(entry["key"])
        else:
            total += entry["bytes"]
    return removed


def clear_cache(root: str | Path) -> tuple[int, list[str]]:
    """Delete a dataset's feature cache (derived data): the key folders microclf made, then
    the cache folder itself if nothing else is in it. Returns (bytes freed, the names left
    because microclf did not write them). A cache folder that is a symbolic link is refused
    (OutputError): nothing is deleted through a link."""
    if link := _linked_cache(root):
        raise OutputError(
            f"{link} is a symbolic link to {os.path.realpath(link)}; microclf does not delete "
            f"through links: remove the link itself (rm {link}) or empty its target yourself"
        )
    base = Path(root) / CACHE_DIR
    freed = 0
    for folder in _own_folders(base):
        freed += _folder_bytes(folder)
        shutil.rmtree(folder)
    left = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
    if base.is_dir() and not left:
        base.rmdir()
    return freed, left


class FeatureCache:
    """Features per file content hash in ``root/.microclf-cache/<key>/``."""

    def __init__(self, root: str | Path, key: str, fields: dict | None = None):
        self.folder = Path(root) / CACHE_DIR / key
        self.fields = fields or {}
        self.hits = 0
        self.computed = 0
        self.unwritable: str | None = None  # why saving failed (a read-only dataset)

    def _path(self, digest: str) -> Path:
        return self.folder / f"{digest}.npy"

    def load(self, digest: str, mmap: bool = False) -> np.ndarray | None:
        """The file's ``(pages, views, D)`` entry (memory-mapped, read-only, with ``mmap``)."""
        path = self._path(digest)
        if not path.exists():
            return None
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError):  # a damaged cache entry is recomputed
            return None

    def _make_folder(self) -> None:
        """The key folder with its ``key.json``, which marks it as microclf's (only marked
        folders are ever pruned or cleared)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / KEY_FILE).exists():
            (self.folder / KEY_FILE).write_text(json.dumps(self.fields, indent=1))

    def touch(self) -> None:
        """Mark the folder as used now (pruning goes by this), writing ``key.json`` once."""
        try:
            self._make_folder()
            (self.folder / STAMP_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        except OSError as exc:
            self.unwritable = str(exc)

    def save(self, digest: str, feats: np.ndarray) -> None:
        try:
            self._make_folder()
            fd, tmp = mkstemp_for_user(prefix=".tmp-", suffix=".npy", dir=self.folder)
        except OSError as exc:
            self.unwritable = str(exc)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, feats)
            os.replace(tmp, self._path(digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def assembled_path(self, name: str) -> Path:
        return self.folder / f"{ASSEMBLED_PREFIX}{name}.npy"

    def open_assembled(self, name: str, shape: tuple) -> np.memmap | None:
        """The assembled set ``name`` if it is there with this shape (read-only), else None."""
        path = self.assembled_path(name)
        try:
            out = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # absent, or damaged: assembled again
            return None
        if out.shape != shape or out.dtype != np.float32:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept by _drop_old_assembled
        return out

    def new_assembled(self, shape: tuple) -> tuple[np.memmap, str] | None:
        """A writable ``.npy`` memmap in a temporary file of the folder, or None if the
        folder cannot hold it (then the caller assembles in memory)."""
        try:
            self._make_folder()
            fd, tmp = mkstemp_for_user(prefix=".tmp-", suffix=".npy", dir=self.folder)
            os.close(fd)
            return np.lib.format.open_memmap(tmp, "w+", np.float32, shape), tmp
        except OSError as exc:
            self.unwritable = str(exc)
            if "tmp" in locals() and os.path.exists(tmp):
                os.unlink(tmp)
            return None

    def finish_assembled(self, out: np.memmap, tmp: str, name: str) -> np.memmap:
        """Publish the filled temporary as ``assembled-<name>.npy`` and map it read-only."""
        out.flush()
        del out
        path = self.assembled_path(name)
        os.replace(tmp, path)
        self._drop_old_assembled()
        return np.load(path, mmap_mode="r")

    def _drop_old_assembled(self) -> None:
        old = sorted(
            self.folder.glob(f"{ASSEMBLED_PREFIX}*.npy"),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for path in old[ASSEMBLED_KEEP:]:
            try:  # a training that has it mapped keeps reading it (POSIX)
                path.unlink()
            except OSError:
                continue


def make_backbone(classifier):
    """The classifier's own frozen base and pooling, as a model of its own (shared weights).

    Called with ``training=False`` the classifier's augmentation layers pass images through.
    """
    import keras

    return keras.Model(classifier.input, classifier.get_layer("avg_pool").output, name="backbone")


def make_augment(strength: float, seed: int):
    """The classifier's augmentation (see ``model.build_augmentation``) as one image warp.

    Random horizontal and vertical flips, rotation of ±strength of a full turn and zoom of
    ±strength (reflect fill), then contrast of ±strength, per image, like Keras'
    RandomFlip/RandomRotation/RandomZoom/RandomContrast layers. Flips, rotation and zoom are
    composed into one affine transform, so each augmented view costs one interpolation
    instead of three (0.8 ms instead of 2.1 ms per 224 px image here).
    """
    import math

    import tensorflow as tf

    gen = tf.random.Generator.from_seed(seed)

    def augment(x):
        n = tf.shape(x)[0]
        h, w = tf.cast(tf.shape(x)[1], tf.float32), tf.cast(tf.shape(x)[2], tf.float32)
        angle = gen.uniform([n], -strength * 2 * math.pi, strength * 2 * math.pi)
        zoom = 1.0 + gen.uniform([n], -strength, strength)
        fx = tf.where(gen.uniform([n]) < 0.5, -1.0, 1.0)
        fy = tf.where(gen.uniform([n]) < 0.5, -1.0, 1.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        a0, a1 = cos * zoom * fx, -sin * zoom * fy
        b0, b1 = sin * zoom * fx, cos * zoom * fy
        cx, cy = (w - 1) / 2, (h - 1) / 2
        zeros = tf.zeros([n])
        transforms = tf.stack(
            [a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], axis=1
        )
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x,
            transforms=transforms,
            output_shape=tf.shape(x)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        factor = 1.0 + gen.uniform([n, 1, 1, 1], -strength, strength)
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return tf.clip_by_value((x - mean) * factor + mean, 0.0, 255.0)

    augment.generator = gen  # FeatureExtractor.reseed resets it
    return augment


class FeatureExtractor:
    """Runs the backbone (optionally after augmentation) over preprocessed images in batches.

    ``engine="openvino"``: the backbone runs on OpenVINO at fp32 (the augmentation stays a
    TensorFlow op, with the same random draws); its conversion is cached by ``weights_id``
    (:func:`~.model.weights_identity`) where given, so it is made once per weights and size.
    """

    def __init__(
        self,
        classifier,
        seed: int,
        augment_strength: float = 0.05,
        batch_size: int = 32,
        *,
        engine: str = "tensorflow",
        weights_id: str | None = None,
    ):
        import tensorflow as tf

        self.backbone = make_backbone(classifier)
        self.batch_size = batch_size
        self.engine = engine
        image_size = classifier.input_shape[1]
        spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
        backbone, aug = self.backbone, make_augment(augment_strength, seed)
        self._generator = aug.generator
        self.ov_model = None  # the converted backbone (OpenVINO)
        if engine == "openvino":
            self.ov_model = backbone_ir(backbone, weights_id, image_size)
            runner = OpenVinoRunner(self.ov_model)
            warp = tf.function(aug, input_signature=spec)
            self._plain = lambda x: runner(x)[0]
            self._augmented = lambda x: runner(np.asarray(warp(x)))[0]
            return
        self._plain = tf.function(lambda x: backbone(x, training=False), input_signature=spec)
        self._augmented = tf.function(
            lambda x: backbone(aug(x), training=False), input_signature=spec
        )

    def reseed(self, seed: int) -> None:
        """Restart the augmented views' random draws from ``seed``."""
        self._generator.reset_from_seed(seed)

    @property
    def dim(self) -> int:
        return int(self.backbone.output_shape[-1])

    def __call__(self, images: np.ndarray, augmented: bool = False) -> np.ndarray:
        fn = self._augmented if augmented else self._plain
        out = [
            np.asarray(fn(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return (
            np.concatenate(out)
            if out
            else np.zeros((0, self.backbone.output_shape[-1]), np.float32)
        )


def extract_features(
    refs: Sequence[PageRef],
    views: int,
    spec: PreprocessSpec,
    extractor: FeatureExtractor,
    cache: FeatureCache | None,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    memmap: bool | None = None,
) -> np.ndarray | None:
    """``(len(refs), views, D)`` float32 features; view 0 is the plain image, 1.. augmented.

    Only pages whose file is missing from the cache (or has fewer views cached) are read
    and run through the backbone; ``on_progress(done, total, seconds)`` counts backbone
    images. Returns None if stopped.

    Above :func:`memmap_threshold_bytes` (with a writable cache) the result is a read-only
    ``np.memmap`` of ``assembled-<hash>.npy`` in the key folder, the hash naming the files'
    contents, pages and ``views``: a second call with nothing changed maps that file at
    once. Below it, or when the cache cannot be written, an ordinary array. Either way each
    cached entry is read memory-mapped, one file at a time, straight into the result.
    ``memmap``: True or False decides instead of the threshold.
    """
    by_file: dict[Path, list[int]] = {}
    for i, r in enumerate(refs):
        by_file.setdefault(Path(r.path), []).append(i)
    digests = {p: file_digest(p) for p in by_file}
    shape = (len(refs), views, extractor.dim)
    big = 4 * np.prod(shape) > memmap_threshold_bytes() if memmap is None else memmap
    big = big and cache is not None and len(refs) > 0
    name, tmp = None, None
    if big:
        text = json.dumps([views, [(digests[Path(r.path)], int(r.page)) for r in refs]])
        name = hashlib.sha1(text.encode()).hexdigest()[:16]
        done_before = cache.open_assembled(name, shape)
        if done_before is not None:
            cache.hits += len(refs)
            return done_before
        made = cache.new_assembled(shape)
        if made is not None:
            out, tmp = made
    if tmp is None:
        out = np.empty(shape, np.float32)
    try:
        result = _fill(
            refs, views, spec, extractor, cache, by_file, digests, out, on_progress, should_stop
        )
        if result is None or tmp is None:
            return result
        published = cache.finish_assembled(out, tmp, name)
        tmp = None
        return published
    finally:
        if tmp is not None and os.path.exists(tmp):
            del out
            os.unlink(tmp)


def _cached_views(entry: np.ndarray | None, page: int) -> int:
    """How many views of ``page`` the entry holds (a prefix; NaN rows were never computed)."""
    if entry is None or page >= len(entry) or not entry.shape[1]:
        return 0
    return int(np.isfinite(entry[page]).all(axis=1).cumprod().sum())


def _fill(refs, views, spec, extractor, cache, by_file, digests, out, on_progress, should_stop):
    """:func:`extract_features` into ``out``: cached rows copied, missing ones computed."""
    todo: list[tuple[int, int]] = []  # (ref index, first missing view)
    for path, idx in by_file.items():
        entry = cache.load(digests[path], mmap=True) if cache is not None else None
        for i in idx:
            page = refs[i].page
            have = min(_cached_views(entry, page), views)
            if have:
                out[i, :have] = entry[page, :have]
            if have == views and cache is not None:
                cache.hits += 1
            else:
                todo.append((i, have))
        del entry  # one file's entry mapped at a time
    total = sum(views - start for _, start in todo)
    done, t0 = 0, time.perf_counter()
    step = max(extractor.batch_size, 1)
    chunks = [todo[b : b + step] for b in range(0, len(todo), step)]
    # Decoding the next chunk overlaps the backbone's work on this one.
    pool = ThreadPoolExecutor(max_workers=1)
    load = lambda chunk: preprocess_refs([refs[i] for i, _ in chunk], spec)  # noqa: E731
    pending = pool.submit(load, chunks[0]) if chunks else None
    for c, chunk in enumerate(chunks):
        images = pending.result()
        pending = pool.submit(load, chunks[c + 1]) if c + 1 < len(chunks) else None
        for v in range(views):
            rows = [k for k, (_, start) in enumerate(chunk) if start <= v]
            if not rows:
                continue
            feats = extractor(images[rows], augmented=v > 0)
            for k, f in zip(rows, feats, strict=True):
                out[chunk[k][0], v] = f
            done += len(rows)
            if on_progress is not None:
                on_progress(done, total, time.perf_counter() - t0)
            if should_stop is not None and should_stop():
                pool.shutdown(wait=True, cancel_futures=True)
                return None
    pool.shutdown()
    if cache is not None and todo:
        changed = {i for i, _ in todo}
        for path, idx in by_file.items():
            if changed.intersection(idx):
                n_pages = max(refs[i].page for i in idx) + 1
                old = cache.load(digests[path])  # merged with: views of other runs kept
                stored = _merge(old, {refs[i].page: out[i] for i in idx}, n_pages)
                cache.save(digests[path], stored)
        cache.computed += len(todo)
    return out


def _merge(old: np.ndarray | None, pages: dict[int, np.ndarray], n_pages: int) -> np.ndarray:
    """Combine cached and new per-page views into one ``(pages, views, D)`` array."""
    n_pages = max(n_pages, 0 if old is None else len(old))
    views = max([a.shape[0] for a in pages.values()] + ([old.shape[1]] if old is not None else []))
    dim = next(iter(pages.values())).shape[-1]
    out = np.full((n_pages, views, dim), np.nan, np.float32)
    if old is not None:
        out[: len(old), : old.shape[1]] = old
    for p, a in pages.items():
        out[p, : a.shape[0]] = a
    return out
