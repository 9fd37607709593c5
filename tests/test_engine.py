"""The OpenVINO engine: the same features and probabilities as TensorFlow (within 1e-4) for
both backbones, a training that records its engine and carries its converted model, a
prediction that then needs no TensorFlow, cache keys that tell engines apart, the bf16 mode,
and TensorFlow alone when OpenVINO is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from napari_microclf.core import engine as engine_mod
from napari_microclf.core import settings
from napari_microclf.core.bundle import write_bundle
from napari_microclf.core.dataset import load_samples
from napari_microclf.core.engine import EngineError, check_precision, resolve_engine
from napari_microclf.core.features import FeatureExtractor, cache_key, key_fields
from napari_microclf.core.images import PreprocessSpec, preprocess_refs
from napari_microclf.core.model import B0, LITE0, build_classifier
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.sample import make_sample_stack, write_sample
from napari_microclf.core.train import Message, TrainConfig, train

if not engine_mod.openvino_available():
    pytest.skip("openvino is not installed", allow_module_level=True)
SIZE = 96  # small enough to be quick; the conversion does not depend on it


@pytest.fixture(autouse=True)
def _own_conversion_cache(tmp_path_factory, monkeypatch):
    """Converted models go to a throw-away Keras home (shared by this module's tests), and
    "auto" means what it means for a user."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.getbasetemp() / "keras-home"))
    monkeypatch.delenv(settings.ENGINE.name, raising=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("s") / "s", n_per_class=8, size=SIZE, seed=5)


@pytest.fixture(scope="module")
def images(sample):
    refs = load_samples(sample["dataset"]).train[:12]
    return preprocess_refs(refs, PreprocessSpec(SIZE))


def _classifier(backbone):
    # Lite0 with its ImageNet weights (installed with microclf); B0's cannot be downloaded
    # here, so its parity is checked on a seeded random start (the same graph and compute)
    weights = "auto" if backbone == LITE0 else None
    return build_classifier(3, SIZE, weights, backbone=backbone, seed=1, warn=False)


@pytest.mark.parametrize("backbone", [LITE0, B0])
def test_openvino_features_and_probabilities_equal_tensorflows(backbone, images, tmp_path):
    model = _classifier(backbone)
    for augmented in (False, True):  # the augmented views draw the same random warps
        tf_f = FeatureExtractor(model, seed=3)(images, augmented=augmented)
        ov_f = FeatureExtractor(model, seed=3, engine="openvino")(images, augmented=augmented)
        assert ov_f.shape == (len(images), 1280) and np.std(tf_f) > 0
        np.testing.assert_allclose(ov_f, tf_f, rtol=0, atol=1e-4)
    meta = {"class_names": ["a", "b", "c"], "preprocessing": PreprocessSpec(SIZE).to_dict()}
    bundle = write_bundle(tmp_path / "m", model, meta)
    pages = [(None, i, (img * 40).astype(np.uint16)[..., 0]) for i, img in enumerate(images)]
    tf_p = list(Predictor(bundle, engine="tensorflow").predict_pages(pages, tta=True))
    ov_p = list(Predictor(bundle, engine="openvino").predict_pages(pages, tta=True))
    for a, b in zip(tf_p, ov_p, strict=True):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 1e-4
        top2 = sorted(a.probabilities.values())[-2:]
        if top2[1] - top2[0] > 2e-4:  # a random head can leave two classes tied
            assert a.class_name == b.class_name
    # a bundle without its own converted model is converted once, then read from the cache
    cached = list((engine_mod.cache_root()).glob("*/model.xml"))
    assert cached, "the conversion was not cached"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "convert", lambda *a, **k: pytest.fail("converted twice"))
        again = list(Predictor(bundle, engine="openvino").predict_pages(pages[:2]))
    assert [p.class_name for p in again] == [p.class_name for p in ov_p[:2]]


def test_feature_cache_key_tells_engines_and_precisions_apart():
    spec = PreprocessSpec(SIZE)
    keys = {e: cache_key(spec, "w", 0, 0.05, e) for e in ("openvino", "tensorflow")}
    assert keys["openvino"] != keys["tensorflow"]
    fields = key_fields(spec, "w", 0, 0.05, "openvino")
    assert fields["engine"].startswith("openvino ") and fields["engine"].endswith(" f32")


def _train(sample, out, engine, **kw):
    msgs = []
    config = TrainConfig(
        sample["dataset"],
        str(out),
        epochs=2,
        batch_size=8,
        image_size=64,
        backbone=LITE0,
        weights="auto",
        seed=0,
        views=1,
        engine=engine,
        **kw,
    )
    result = train(config, lambda u: msgs.append(u.text) if isinstance(u, Message) else None)
    return result, msgs


@pytest.fixture(scope="module")
def on_openvino(sample, tmp_path_factory):
    """A training on OpenVINO (read-only): its bundle holds its OpenVINO copy."""
    return _train(sample, tmp_path_factory.mktemp("ov") / "m", "openvino")


def test_a_training_on_openvino_records_it_and_predicts_without_tensorflow(
    sample, on_openvino, tmp_path
):
    result, msgs = on_openvino
    features = next(m for m in msgs if m.startswith("Backbone features"))
    assert "computed" in features and any("Inference engine: openvino" in m for m in msgs)
    meta = json.loads((result.bundle / "microclf.json").read_text())
    assert meta["engine"]["features"].startswith("openvino ")
    assert meta["engine"]["evaluation"].startswith("openvino ")
    assert engine_mod.IR_XML in meta["files"] and engine_mod.IR_BIN in meta["files"]
    # the same training on TensorFlow computes its own features (another cache key)...
    _, tf_msgs = _train(sample, tmp_path / "t", "tensorflow")
    tf_features = next(m for m in tf_msgs if m.startswith("Backbone features"))
    assert not tf_features.startswith("Backbone features: 0 image(s) computed")
    # ...and the OpenVINO one's cache is reused by the next OpenVINO training
    _, again = _train(sample, tmp_path / "m2", "openvino")
    assert next(m for m in again if m.startswith("Backbone features")).startswith(
        "Backbone features: 0 image(s) computed"
    )

    stack = tmp_path / "stack.tif"
    import tifffile

    tifffile.imwrite(stack, make_sample_stack(size=SIZE, seed=2)[0])
    script = textwrap.dedent(
        f"""
        import json, sys
        from napari_microclf.core.predictor import Predictor
        p = Predictor({str(result.bundle)!r}, engine="openvino")
        rows = [
            (r.class_name, r.probabilities, r.unfamiliar_score)
            for r in p.predict_file({str(stack)!r})
        ]
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "imported TF"
        print(json.dumps(rows))
        """
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "empty-home")}  # no cached conversion
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ov_rows = json.loads(out.stdout.strip().splitlines()[-1])
    tf_rows = list(Predictor(result.bundle, engine="tensorflow").predict_file(stack))
    assert len(ov_rows) == len(tf_rows) == 12
    for (name, probs, score), row in zip(ov_rows, tf_rows, strict=True):
        assert name == row.class_name
        assert max(abs(probs[k] - row.probabilities[k]) for k in probs) < 1e-4
        assert score == pytest.approx(row.unfamiliar_score, rel=1e-3, abs=1e-4)


def test_a_replaced_model_keras_is_never_shadowed_by_its_old_openvino_copy(
    on_openvino, private_copy
):
    import keras

    written = on_openvino[0].bundle
    bundle = private_copy(written)
    model = keras.saving.load_model(bundle / "model.keras", compile=False)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel[:, ::-1], bias[::-1]])  # other answers
    model.save(bundle / "model.keras")
    stack = make_sample_stack(4, size=SIZE, seed=3)[0]

    def probs(predictor):
        return np.array(
            [list(r.probabilities.values()) for r in predictor.predict_array(stack, page_axis=0)]
        )

    with pytest.warns(UserWarning, match="not the file this model folder was written with"):
        ov = Predictor(bundle, engine="openvino")
    assert ov.familiarity is None  # fitted on the old model's features: not used
    with pytest.warns(UserWarning):
        tf = Predictor(bundle, engine="tensorflow")
    np.testing.assert_allclose(probs(ov), probs(tf), atol=1e-4)  # the new model.keras answers
    # the bundle as written: its own copy, no warning, other answers than the replaced one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = Predictor(written, engine="openvino")
    assert before.familiarity is not None
    assert np.abs(probs(before) - probs(ov)).max() > 1e-3


def test_int8_calibrates_on_the_training_images_once(sample, tmp_path):
    pytest.importorskip("nncf")  # the optional int8 extra
    _train(sample, tmp_path / "m", "openvino")
    stack = make_sample_stack(size=SIZE, seed=2)[0]
    f32 = Predictor(tmp_path / "m", engine="openvino").predict_array(stack, page_axis=0)
    int8 = Predictor(tmp_path / "m", engine="openvino", precision="int8")
    rows = int8.predict_array(stack, page_axis=0)
    assert len(rows) == len(f32) == 12
    for a, b in zip(f32, rows, strict=True):
        assert sum(b.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 0.5
    with pytest.MonkeyPatch.context() as mp:  # the quantized model is kept: not made again
        mp.setattr(engine_mod, "quantize_int8", lambda *a: pytest.fail("quantized twice"))
        again = Predictor(tmp_path / "m", engine="openvino", precision="int8")
        assert [r.probabilities for r in again.predict_array(stack, page_axis=0)] == [
            r.probabilities for r in rows
        ]
    # what int8 costs on this model's own test list, before relying on it
    from napari_microclf.core.evaluate import evaluate

    report = evaluate(tmp_path / "m", precision="int8", save=False)
    assert report["engine"].endswith(" int8") and report["n"] > 0
    meta = json.loads((tmp_path / "m" / "microclf.json").read_text())
    meta["data_dir"] = str(tmp_path / "moved")  # the training images are gone...
    (tmp_path / "m" / "microclf.json").write_text(json.dumps(meta))
    moved = Predictor(tmp_path / "m", engine="openvino", precision="int8")
    assert moved.predict_array(stack[0])[0].probabilities == rows[0].probabilities  # kept
    with pytest.MonkeyPatch.context() as mp:  # ...and on another computer: said, in one line
        mp.setenv("KERAS_HOME", str(tmp_path / "other-home"))
        with pytest.raises(EngineError, match="calibrates on the model's training images"):
            Predictor(tmp_path / "m", engine="openvino", precision="int8").predict_array(stack[0])


def test_bf16_is_prediction_only_and_close(sample, images, tmp_path):
    with pytest.raises(EngineError, match="OpenVINO"):
        check_precision("bf16", "tensorflow")
    with pytest.raises(EngineError, match="f32, bf16 or int8"):
        check_precision("int4", "openvino")
    model = _classifier(LITE0)
    meta = {"class_names": ["a", "b", "c"], "preprocessing": PreprocessSpec(SIZE).to_dict()}
    bundle = write_bundle(tmp_path / "m", model, meta)
    pages = [(None, i, img[..., 0]) for i, img in enumerate(images)]
    f32 = list(Predictor(bundle, engine="openvino").predict_pages(pages))
    if engine_mod.cpu_has_bf16():
        bf16 = list(Predictor(bundle, engine="openvino", precision="bf16").predict_pages(pages))
        diff = max(abs(a.confidence - b.confidence) for a, b in zip(f32, bf16, strict=True))
        assert 0 < diff < 0.1  # close, not equal: the documented trade
    else:  # said, and run at f32
        with pytest.warns(UserWarning, match="no bf16 instructions"):
            predictor = Predictor(bundle, engine="openvino", precision="bf16")
            bf16 = list(predictor.predict_pages(pages))
        assert [a.probabilities for a in f32] == [b.probabilities for b in bf16]


def test_tensorflow_alone_when_openvino_is_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    assert not engine_mod.openvino_available()
    assert resolve_engine("auto") == "tensorflow"
    with pytest.raises(EngineError, match="pip install openvino"):
        resolve_engine("openvino")
    monkeypatch.setenv(settings.ENGINE.name, "openvino")
    with pytest.raises(EngineError, match="pip install openvino"):
        resolve_engine("auto")
    monkeypatch.delenv(settings.ENGINE.name)
    model = build_classifier(2, 32, None, fine_tune="all", augment=False, seed=0)
    meta = {"class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()}
    bundle = write_bundle(tmp_path / "m", model, meta)
    (row,) = Predictor(bundle).predict_array(np.random.default_rng(0).random((40, 40)))
    assert row.class_name in ("a", "b")


def test_unknown_engine_is_refused_in_one_line(tmp_path):
    with pytest.raises(EngineError, match="auto, openvino, tensorflow"):
        resolve_engine("onnx")
    with pytest.raises(EngineError):
        TrainConfig(str(tmp_path), str(tmp_path / "m"), engine="cuda")
