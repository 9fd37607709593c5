"""Cached backbone features: same numbers as the full pipeline, invalidation, reuse; and
prediction memory bounded by the batch, not the stack."""

import re
import tracemalloc

import keras
import numpy as np
import pytest
import tifffile

from napari_microclf.core.features import CACHE_DIR, FeatureExtractor, cache_key
from napari_microclf.core.images import PreprocessSpec, preprocess_refs
from napari_microclf.core.model import build_classifier, write_bundle
from napari_microclf.core.predict import Predictor
from napari_microclf.core.sample import make_image, write_sample
from napari_microclf.core.train import Message, TrainConfig, train


@pytest.fixture()
def data(tmp_path):
    return write_sample(tmp_path / "s", n_per_class=10, size=48, seed=3)["dataset"]


def _run(data, out, **kw):
    args = dict(epochs=1, batch_size=8, image_size=32, weights=None, augment=False,
                dropout=0.0, early_stopping=False, seed=0)
    args.update(kw)
    msgs = []
    result = train(TrainConfig(str(data), str(out), **args),
                   lambda u: msgs.append(u.text) if isinstance(u, Message) else None)
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


def test_a_changed_setting_never_reuses_stale_features(data, tmp_path):
    spec = PreprocessSpec(32)
    key = cache_key(spec, None, 0, None)
    assert cache_key(PreprocessSpec(48), None, 0, None) != key  # image size
    assert cache_key(PreprocessSpec(32, pmax=99.0), None, 0, None) != key  # normalisation
    assert cache_key(spec, "imagenet", 0, None) != key  # weights
    assert cache_key(spec, None, 0, 0.05) != key  # augmentation
    w1, w2 = tmp_path / "w1.h5", tmp_path / "w2.h5"
    w1.write_bytes(b"one")
    w2.write_bytes(b"two")
    assert cache_key(spec, str(w1), 0, None) != cache_key(spec, str(w2), 0, None)
    _run(data, tmp_path / "m")
    _, bigger, reused = _run(data, tmp_path / "m", image_size=40)
    assert bigger[0] == 30 and reused == 0
    assert len(list((data / CACHE_DIR).iterdir())) == 2


def test_fine_tuning_uses_the_full_pipeline(data, tmp_path):
    result, counts, _ = _run(data, tmp_path / "m", fine_tune=1)
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
    model = build_classifier(2, 32, None, fine_tune="all", augment=False)
    return write_bundle(tmp_path_factory.mktemp("bundle") / "b", model, {
        "class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()})


def test_stack_prediction_memory_does_not_grow_with_pages(tiny_bundle, tmp_path):
    predictor = Predictor(tiny_bundle, batch_size=8)
    rng = np.random.default_rng(0)
    for n in (16, 320):
        tifffile.imwrite(tmp_path / f"s{n}.tif",
                         rng.integers(0, 4000, (n, 256, 256)).astype(np.uint16))
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
    quadrants = {int(np.argmax([v[:16, :16].mean(), v[:16, 16:].mean(), v[16:, :16].mean(),
                                v[16:, 16:].mean()])) for v in views}
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
