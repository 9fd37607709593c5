"""Cached backbone features: same numbers as the full pipeline, invalidation, reuse; and
prediction memory bounded by the batch, not the stack."""

import re
import tracemalloc

import keras
import numpy as np
import pytest
import tifffile

from napari_microclf.core.bundle import write_bundle
from napari_microclf.core.features import CACHE_DIR, FeatureExtractor, cache_key
from napari_microclf.core.images import PreprocessSpec, preprocess_refs
from napari_microclf.core.model import LITE0, build_classifier
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.sample import make_image, write_sample
from napari_microclf.core.train import Message, TrainConfig, train


@pytest.fixture()
def data(tmp_path):
    return write_sample(tmp_path / "s", n_per_class=10, size=48, seed=3)["dataset"]


def _run(data, out, **kw):
    args = {  # Lite0 (ImageNet, installed): the cache works alike for both, Lite0 runs sooner
        "epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "backbone": LITE0,
        "weights": "imagenet",
        "augment": False,
        "dropout": 0.0,
        "early_stopping": False,
        "seed": 0,
    }
    args.update(kw)
    msgs = []
    result = train(
        TrainConfig(str(data), str(out), **args),
        lambda u: msgs.append(u.text) if isinstance(u, Message) else None,
    )
    line = next((m for m in msgs if m.startswith("Backbone features")), None)
    counts = tuple(map(int, re.findall(r"(\d+) image", line))) if line else None
    reused = int(re.search(r"(\d+) reused", line).group(1)) if line else None
    return result, counts, reused


def test_cached_features_equal_the_full_models(data):
    from napari_microclf.core.dataset import load_samples

    refs = load_samples(data).train[:6]
    images = preprocess_refs(refs, PreprocessSpec(32))
    # the extractor of the cached path, on a classifier with augmentation layers...
    cached = FeatureExtractor(build_classifier(3, 32, None, seed=0), seed=0)(images)
    # ...against a separately built classifier's own pooled output
    full = build_classifier(3, 32, None, augment=False, seed=0)
    pooled = keras.Model(full.input, full.get_layer("avg_pool").output)
    expected = pooled.predict(images, verbose=0)
    assert cached.shape == (6, 1280) and np.std(expected) > 0
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-5)


def test_cached_and_full_training_give_the_same_first_epoch_loss(data, tmp_path):
    cached, counts, _ = _run(data, tmp_path / "a", cache=True)
    full, none, _ = _run(data, tmp_path / "b", cache=False)
    assert counts is not None and none is None  # the second really took the full path
    assert cached.meta["cached_features"] and not full.meta["cached_features"]
    assert cached.history["loss"][0] == pytest.approx(full.history["loss"][0], rel=1e-4)
    assert cached.history["val_loss"][0] == pytest.approx(full.history["val_loss"][0], rel=1e-4)
    # the saved bundle is a full image classifier in both cases
    img = make_image("round", np.random.default_rng(0), 48)
    a = Predictor(cached.bundle).predict_array(img)[0]
    b = Predictor(full.bundle).predict_array(img)[0]
    assert a.class_name == b.class_name and a.confidence == pytest.approx(b.confidence, rel=1e-4)


def test_retraining_reuses_unchanged_files_and_recomputes_changed_ones(data, tmp_path):
    _, first, reused = _run(data, tmp_path / "m")
    assert first[0] == 30 and reused == 0
    _, again, reused = _run(data, tmp_path / "m")
    assert again[0] == 0 and reused == 30
    # three new images and one edited file: only those four reach the backbone
    rng = np.random.default_rng(9)
    for i in range(3):
        tifffile.imwrite(data / "round" / f"new_{i}.tif", make_image("round", rng, 48))
    edited = sorted((data / "elongated").iterdir())[0]
    tifffile.imwrite(edited, make_image("elongated", rng, 48))
    _, third, reused = _run(data, tmp_path / "m")
    assert third[0] == 4 and reused == 29


def test_augmented_views_are_cached_too(data, tmp_path):
    _, counts, _ = _run(data, tmp_path / "m", augment=True, views=2)
    result, again, reused = _run(data, tmp_path / "m", augment=True, views=2)
    assert counts[0] == 30 and again[0] == 0 and reused == 30
    # more views than cached: only the missing views are computed
    _, more, _ = _run(data, tmp_path / "m", augment=True, views=3)
    assert more[0] > 0 and more[0] < 30


def test_a_changed_setting_never_reuses_stale_features(data, tmp_path, monkeypatch):
    from napari_microclf.core import features
    from napari_microclf.core.model import weights_identity

    spec = PreprocessSpec(32)
    rid = weights_identity("efficientnet-b0", None, 0)
    key = cache_key(spec, rid, 0, None)
    assert cache_key(PreprocessSpec(48), rid, 0, None) != key  # image size
    assert cache_key(PreprocessSpec(32, pmax=99.0), rid, 0, None) != key  # normalisation
    assert cache_key(PreprocessSpec(32, intensity="fixed"), rid, 0, None) != key
    assert cache_key(spec, weights_identity("efficientnet-b0", None, 1), 0, None) != key
    assert cache_key(spec, weights_identity("efficientnet-lite0", None, 0), 0, None) != key
    assert cache_key(spec, rid, 0, 0.05) != key  # augmentation
    assert cache_key(spec, rid, 1, 0.05) != cache_key(spec, rid, 0, 0.05)  # the views' seed
    # the weights' content, not their name: the same path with other bytes is another key
    w = tmp_path / "w.h5"
    w.write_bytes(b"one")
    first = cache_key(spec, weights_identity("efficientnet-b0", str(w), 0), 0, None)
    w.write_bytes(b"other")
    assert cache_key(spec, weights_identity("efficientnet-b0", str(w), 0), 0, None) != first
    # ... the ImageNet file in the Keras cache included
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    (tmp_path / "kh" / "models").mkdir(parents=True)
    (tmp_path / "kh" / "models" / "efficientnetb0_notop.h5").write_bytes(b"v1")
    a = weights_identity("efficientnet-b0", "imagenet", 0)
    (tmp_path / "kh" / "models" / "efficientnetb0_notop.h5").write_bytes(b"v2!")
    assert weights_identity("efficientnet-b0", "imagenet", 0) != a
    # our code's version, TensorFlow's and Keras'
    monkeypatch.setattr(features, "FEATURES_VERSION", features.FEATURES_VERSION + 1)
    assert cache_key(spec, rid, 0, None) != key
    monkeypatch.undo()
    monkeypatch.setattr(keras, "__version__", "0.0.1")
    assert cache_key(spec, rid, 0, None) != key
    monkeypatch.undo()
    import tensorflow as tf

    monkeypatch.setattr(tf, "__version__", "0.0.1")
    assert cache_key(spec, rid, 0, None) != key
    monkeypatch.undo()
    _run(data, tmp_path / "m")
    _, bigger, reused = _run(data, tmp_path / "m", image_size=40)
    assert bigger[0] == 30 and reused == 0
    assert len(list((data / CACHE_DIR).iterdir())) == 2
    assert all((d / "key.json").exists() for d in (data / CACHE_DIR).iterdir())


# The features of one fixed image through preprocessing, the augmented views and a backbone
# with fixed weights, pinned for each FEATURES_VERSION. If this fails while FEATURES_VERSION
# did not change, code that alters cached features changed without a bump: bump
# features.FEATURES_VERSION (old caches are then never reused) and pin the new values here.
PINNED_FEATURES = {
    3: [11.982, 35.673, 12.274, 34.601, 1132.486, 1100.990, 1283.893, 0.0, 0.0, 2.236, 0.0]
}


def _fixed_image_features():
    from napari_microclf.core.features import make_augment
    from napari_microclf.core.images import preprocess

    rng = np.random.default_rng(42)
    page = (make_image("elongated", rng, 64) * 1.0).astype(np.uint16)[:, 8:56]
    page[5:7, 5:7] = 60000  # a hot spot: percentile clipping matters; not square: padding
    x = preprocess(page, PreprocessSpec(48))[None]
    views = np.asarray(make_augment(0.05, seed=7)(np.repeat(x, 2, axis=0)))
    model = build_classifier(2, 48, "imagenet", augment=False, backbone="efficientnet-lite0")
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    feats = pooled.predict(np.concatenate([x, views]), verbose=0)
    return np.round(
        [x.mean(), x.std(), views.mean(), views.std(), *feats.sum(axis=1), *feats[0, :4]], 3
    )


def test_feature_code_changes_bump_the_version():
    from napari_microclf.core.features import FEATURES_VERSION

    got = _fixed_image_features()
    pinned = PINNED_FEATURES.get(FEATURES_VERSION)
    assert pinned is not None, f"pin PINNED_FEATURES[{FEATURES_VERSION}] = {got.tolist()}"
    np.testing.assert_allclose(
        got,
        pinned,
        rtol=2e-3,
        atol=2e-3,
        err_msg=("features of the fixed image changed: bump FEATURES_VERSION in core/features.py"),
    )


def test_old_and_oversized_cache_folders_are_pruned(data, tmp_path):
    import os
    import time

    from napari_microclf.cli import main as cli_main
    from napari_microclf.core.features import cache_entries, prune_cache

    _run(data, tmp_path / "m")
    _run(data, tmp_path / "m", image_size=40)
    _run(data, tmp_path / "m", image_size=48)
    entries = cache_entries(data)
    assert len(entries) == 3
    newest, middle, oldest = (e["folder"] for e in entries)
    # unused for 31 days: gone; the one in use is kept whatever its age
    old = time.time() - 31 * 86400
    os.utime(oldest / "last-used", (old, old))
    os.utime(newest / "last-used", (old, old))
    (middle / ".tmp-killed.npy").write_bytes(b"x")
    os.utime(middle / ".tmp-killed.npy", (old, old))
    removed = prune_cache(data, keep=newest.name)
    assert removed == [oldest.name] and newest.exists() and middle.exists()
    assert not (middle / ".tmp-killed.npy").exists()  # a killed run's temporary file
    # beyond the size cap: the least recently used go first, never the one in use
    assert prune_cache(data, keep=newest.name, max_bytes=1) == [middle.name]
    assert newest.exists()
    assert cli_main(["cache", "info", str(data)]) == 0
    assert cli_main(["cache", "clear", str(data)]) == 0
    assert not (data / CACHE_DIR).exists()


def test_fine_tuning_uses_the_full_pipeline(data, tmp_path):
    result, counts, _ = _run(data, tmp_path / "m", fine_tune=1, head_epochs=0)
    assert counts is None and not result.meta["cached_features"]


def _peak_bytes(predictor, path):
    tracemalloc.start()
    n = sum(1 for _ in predictor.predict_file(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return n, peak


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A two-class bundle of a random 32 px model: prediction mechanics, not accuracy."""
    model = build_classifier(2, 32, None, fine_tune="all", augment=False, backbone=LITE0)
    return write_bundle(
        tmp_path_factory.mktemp("bundle") / "b",
        model,
        {"class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()},
    )


def test_stack_prediction_memory_does_not_grow_with_pages(tiny_bundle, tmp_path):
    predictor = Predictor(tiny_bundle, batch_size=8)
    rng = np.random.default_rng(0)
    for n in (16, 320):
        tifffile.imwrite(
            tmp_path / f"s{n}.tif", rng.integers(0, 4000, (n, 256, 256)).astype(np.uint16)
        )
    _peak_bytes(predictor, tmp_path / "s16.tif")  # warm up: tracing, first allocations
    n_small, small = _peak_bytes(predictor, tmp_path / "s16.tif")
    n_big, big = _peak_bytes(predictor, tmp_path / "s320.tif")
    assert (n_small, n_big) == (16, 320)
    stack_bytes = 320 * 256 * 256 * 2
    assert big < 1.5 * small + 1_000_000, (small, big)
    assert big < stack_bytes / 4


def test_augmented_views_flip_rotate_zoom_and_keep_the_range():
    from napari_microclf.core.features import make_augment

    img = np.zeros((1, 32, 32, 3), np.float32)
    img[0, 4:10, 4:10] = 255  # a bright square near the top-left corner
    views = np.concatenate([np.asarray(make_augment(0.05, seed=s)(img)) for s in range(12)])
    assert views.min() >= 0 and views.max() <= 255
    quadrants = {
        int(
            np.argmax(
                [v[:16, :16].mean(), v[:16, 16:].mean(), v[16:, :16].mean(), v[16:, 16:].mean()]
            )
        )
        for v in views
    }
    assert len(quadrants) >= 3  # the square lands in different quadrants: flips happen
    same = make_augment(0.0, seed=0)(img)  # strength 0: flips only
    assert np.isclose(np.asarray(same).sum(), img.sum(), rtol=1e-3)


def test_streaming_prediction_passes_errors_on_and_stops(tiny_bundle):
    predictor = Predictor(tiny_bundle, batch_size=4)
    rng = np.random.default_rng(0)

    def pages(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"page {i} is unreadable")
            yield ("stack.tif", i, rng.integers(0, 4000, (40, 40)).astype(np.uint16))

    assert [p.page for p in predictor.predict_pages(pages(10))] == list(range(10))
    with pytest.raises(ValueError, match="page 6 is unreadable"):
        list(predictor.predict_pages(pages(10, fail_at=6)))
    got = list(predictor.predict_pages(pages(40), should_stop=lambda: True))
    assert len(got) == 4  # one batch, then the stop request is honoured


def test_every_training_removes_a_killed_runs_cache_temporaries(tmp_path):
    import os
    import time

    from napari_microclf.core.features import remove_stale_temporaries

    folder = tmp_path / CACHE_DIR / "0123456789abcdef"  # a key folder, named as keys are
    folder.mkdir(parents=True)
    killed, writing = folder / ".tmp-killed.npy", folder / ".tmp-writing.npy"
    killed.write_bytes(b"x")
    writing.write_bytes(b"x")  # another training's file, being written right now
    old = time.time() - 3600
    os.utime(killed, (old, old))
    assert remove_stale_temporaries(tmp_path) == 1
    assert not killed.exists() and writing.exists()
    assert remove_stale_temporaries(tmp_path / "no-such-dataset") == 0
