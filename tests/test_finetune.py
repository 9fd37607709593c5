"""Fine-tuning's phase 2 on cached activations (core/finetune.py): the split of the
classifier, the cached views, the schedule and the time budget."""

from __future__ import annotations

import numpy as np
import pytest

from napari_microclf.core import finetune as ft
from napari_microclf.core.model import LITE0, build_classifier


def test_a_time_budget_reads_as_people_write_it():
    assert ft.parse_duration("30m") == 1800
    assert ft.parse_duration("1h30m") == 5400
    assert ft.parse_duration("90s") == 90
    assert ft.parse_duration("1.5h") == 5400
    assert ft.parse_duration("45") == 45 * 60  # a plain number is minutes
    assert ft.parse_duration(None) is None and ft.parse_duration("") is None
    for bad in ("30 minutes please", "m30", "0m"):
        with pytest.raises(ValueError, match="time budget"):
            ft.parse_duration(bad)


def test_the_learning_rate_warms_up_then_decays_along_a_cosine():
    lrs = [ft.warmup_cosine(1e-3, s, 20, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(5e-5) and lrs[19] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20], strict=True))  # warm-up
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:], strict=False))  # decay
    assert lrs[60] == pytest.approx(0.5e-3, rel=0.05)  # half-way down the cosine
    assert lrs[-1] < 0.01 * 1e-3


@pytest.fixture(scope="module")
def classifier():
    return build_classifier(3, 64, None, augment=False, seed=0, fine_tune=2, backbone=LITE0)


def test_the_open_stages_train_the_classifier_itself(classifier):
    """top(lower(x)) is the classifier's answer; training top changes the classifier."""
    import keras

    lower, top = ft.split_classifier(classifier, 2)
    assert tuple(lower.output.shape[1:]) == (4, 4, 112)  # before Lite0's stage 6 at 64 px
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    before = np.asarray(classifier(x, training=False))
    np.testing.assert_allclose(np.asarray(top(lower(x), training=False)), before, atol=1e-5)
    # only the open stages and the head train
    frozen = {w.path for w in lower.weights}
    assert top.trainable_weights and not frozen & {w.path for w in top.trainable_weights}
    top.compile(keras.optimizers.AdamW(1e-2), "sparse_categorical_crossentropy")
    top.fit(np.asarray(lower(x)), np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    after = np.asarray(classifier(x, training=False))
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(np.asarray(top(lower(x), training=False)), after, atol=1e-5)
    with pytest.raises(ValueError, match="1..6 open stages"):
        ft.split_classifier(classifier, 7)


def test_the_cached_views_are_the_eight_symmetries_of_the_square(monkeypatch):
    """Without the crop and the brightness change, view k is the k-th rotation and mirror."""
    import tensorflow as tf

    monkeypatch.setattr(ft, "CROP_AREA", (1.0, 1.0))
    view = ft.make_views(0.0, seed=0)
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    views = [np.asarray(view(tf.constant(x), k)) for k in range(8)]
    np.testing.assert_array_equal(views[0], x)
    for k in range(8):
        expected = np.rot90(x, k % 4, axes=(1, 2))
        expected = expected[:, :, ::-1] if k >= 4 else expected
        np.testing.assert_allclose(views[k], expected, atol=1e-3)
    assert len({v.tobytes() for v in views}) == 8


def test_the_views_crop_and_change_brightness_within_their_ranges():
    import tensorflow as tf

    view = ft.make_views(0.1, seed=0)
    x = np.full((64, 16, 16, 3), 100.0, np.float32)
    out = np.asarray(view(tf.constant(x), 1))
    means = out.mean(axis=(1, 2, 3))
    assert means.min() >= 90 - 1e-3 and means.max() <= 110 + 1e-3 and means.std() > 1


def _tiny():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.AdamW(1.0), "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    return model, x, (x[:, 0] > 0).astype("int32")


def test_the_schedule_sets_each_batchs_learning_rate():
    import keras

    model, x, y = _tiny()
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.append(float(model.optimizer.learning_rate))
    )
    schedule = ft.make_schedule(1e-2, 2, first=0, last=5, steps=4)
    model.fit(x, y, batch_size=10, epochs=5, callbacks=[schedule, record], verbose=0)
    expected = [ft.warmup_cosine(1e-2, s, 8, 20) for s in range(20)]
    np.testing.assert_allclose(seen, expected, rtol=1e-5)


def test_a_time_budget_sets_the_epochs_from_the_first_ones_time():
    import time

    model, x, y = _tiny()
    said = []
    spent = ft.make_schedule(
        1e-2,
        2,
        0,
        30,
        4,
        budget_s=0.0,
        t_start=time.perf_counter(),
        on_epochs=lambda *a: said.append(a),
    )
    history = model.fit(x, y, batch_size=10, epochs=30, callbacks=[spent], verbose=0)
    assert len(history.history["loss"]) == 1 and said[0][0] == 1  # nothing left: one epoch
    said.clear()
    plenty = ft.make_schedule(
        1e-2,
        2,
        0,
        6,
        4,
        budget_s=3600.0,
        t_start=time.perf_counter(),
        on_epochs=lambda *a: said.append(a),
    )
    history = model.fit(x, y, batch_size=10, epochs=6, callbacks=[plenty], verbose=0)
    assert len(history.history["loss"]) == 6 and said[0][0] == 6


def test_label_smoothing_moves_the_targets_off_one_and_zero():
    import keras

    loss = ft.smoothed_loss(0.1, 4)
    p = np.array([[0.925, 0.025, 0.025, 0.025]], np.float32)  # the smoothed target itself
    plain = float(keras.losses.sparse_categorical_crossentropy(np.array([0]), p)[0])
    smoothed = float(np.asarray(loss(np.array([0]), p))[0])
    assert smoothed > plain  # the smoothed loss also pays for the other classes
    entropy = -(0.925 * np.log(0.925) + 3 * 0.025 * np.log(0.025))
    assert smoothed == pytest.approx(entropy, rel=1e-4)  # its minimum, reached at the target
    assert ft.smoothed_loss(0, 4) == "sparse_categorical_crossentropy"
