"""Bundles across versions (a model.keras another Keras wrote; formats this version cannot
read) and zipped bundles (zip_bundle, and read_meta / load_bundle / predict on the zip)."""

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from napari_microclf import __version__
from napari_microclf.core import bundle as bundles
from napari_microclf.core import model as m
from napari_microclf.core import settings
from napari_microclf.core.errors import BundleError, OutputError
from napari_microclf.core.folder_runs import predict_folder
from napari_microclf.core.lock import MODEL_LOCK

X = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Zipped bundles are extracted under $XDG_CACHE_HOME: a fresh one for each test."""
    monkeypatch.delenv(settings.CACHE.name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "napari-microclf" / "bundles"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny trained-like bundle with the metadata training writes (config, versions)."""
    out = tmp_path_factory.mktemp("compat") / "model"
    model = m.build_classifier(
        2, image_size=32, weights=None, fine_tune="all", seed=1, augment_strength=0.1, dropout=0.3
    )
    meta = {
        "format": "microclf-bundle/1",
        "class_names": ["a", "b"],
        "preprocessing": {"image_size": 32, "pmin": 1, "pmax": 99.8},
        "backbone": m.B0,
        "weights": "none",
        "fine_tune": -1,
        "config": {
            "image_size": 32,
            "dropout": 0.3,
            "augment": True,
            "augment_strength": 0.1,
            "fine_tune": "all",
            "backbone": m.B0,
        },
        "versions": bundles.versions(),
        "date": "2026-01-01T10:00:00",
    }
    files = {
        "report.md": "# report\n",
        "split.json": json.dumps(
            {"test": [{"key": "a/1.tif", "sha1": "x", "group": "g"}], "val": [], "train": []}
        ),
    }
    bundles.write_bundle(out, model, meta, files)
    probs = model.predict(X, verbose=0)
    return out, probs


def copy(bundle, dest):
    shutil.copytree(bundle[0], dest)
    return dest


def edit_meta(folder, **changes):
    path = folder / bundles.META_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return meta


def rewrite_archive(model_path, edit):
    """Rewrite the .keras zip, each member's bytes passed through ``edit(name, data)``
    (None drops the member)."""
    with zipfile.ZipFile(model_path) as zf:
        members = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(model_path, "w") as zf:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                zf.writestr(name, data)


def as_keras_9(name, data):
    """What a model.keras from a future Keras looks like to this one: a layer class it does
    not know, and its version."""
    if name == "config.json":
        text = data.decode()
        assert '"class_name": "Dense"' in text
        return text.replace('"class_name": "Dense"', '"class_name": "DenseV9"').encode()
    if name == "metadata.json":
        meta = json.loads(data)
        meta["keras_version"] = "9.0.0"
        return json.dumps(meta).encode()
    return data


def from_the_future(folder):
    rewrite_archive(folder / bundles.MODEL_FILE, as_keras_9)
    versions = {
        **json.loads((folder / bundles.META_FILE).read_text())["versions"],
        "keras": "9.0.0",
        "napari_microclf": "7.0",
    }
    edit_meta(folder, versions=versions)
    return folder


def no_bundle_warnings():
    return warnings.catch_warnings(record=True)


# -- across versions -----------------------------------------------------------------------


def test_a_model_keras_this_keras_cannot_read_is_rebuilt_from_its_meta(bundle, tmp_path):
    folder = from_the_future(copy(bundle, tmp_path / "model"))
    with pytest.raises(Exception, match="DenseV9"):  # what Keras alone makes of it
        keras.saving.load_model(folder / bundles.MODEL_FILE, compile=False)
    expected = (
        rf"Keras 9\.0\.0 \(napari-microclf 7\.0\).*installed Keras "
        rf"{re.escape(keras.__version__)} \(napari-microclf {re.escape(__version__)}\)"
        r".*rebuilt from microclf\.json"
    )
    with pytest.warns(bundles.BundleVersionWarning, match=expected) as caught:
        b = bundles.load_bundle(folder)
    assert len([w for w in caught if issubclass(w.category, bundles.BundleVersionWarning)]) == 1
    assert issubclass(bundles.BundleVersionWarning, UserWarning)
    assert b.class_names == ["a", "b"]
    diff = np.abs(b.model.predict(X, verbose=0) - bundle[1]).max()
    assert diff <= 1e-6, diff


def test_a_rebuild_that_fails_too_is_a_clear_error(bundle, tmp_path):
    # the weights do not fit what microclf.json describes (3 classes)
    folder = copy(bundle, tmp_path / "model")
    from_the_future(folder)
    edit_meta(folder, class_names=["a", "b", "c"])
    with pytest.raises(BundleError) as err:
        bundles.load_bundle(folder)
    msg = str(err.value)
    assert "corrupt or unreadable" in msg and "DenseV9" in msg
    assert "rebuilding it from microclf.json failed too" in msg and "retrain" in msg
    assert f"saved by Keras 9.0.0, this is Keras {keras.__version__}" in msg
    assert "pip install keras==9.0.0" in msg
    # no weights in the archive
    folder = copy(bundle, tmp_path / "noweights")
    rewrite_archive(
        folder / bundles.MODEL_FILE, lambda n, d: None if n.endswith(".h5") else as_keras_9(n, d)
    )
    with pytest.raises(BundleError, match="rebuilding it from microclf.json failed too"):
        bundles.load_bundle(folder)


def test_a_newer_recorded_keras_warns_once_and_loads(bundle, tmp_path):
    folder = copy(bundle, tmp_path / "model")
    with no_bundle_warnings() as caught:
        warnings.simplefilter("always")
        bundles.load_bundle(folder)  # the installed versions: nothing to say
    assert not [w for w in caught if issubclass(w.category, bundles.BundleVersionWarning)]
    major, minor = (int(p) for p in keras.__version__.split(".")[:2])
    newer = f"{major}.{minor + 1}.0"
    versions = {**bundles.read_meta(folder)["versions"], "keras": newer}
    edit_meta(folder, versions=versions)
    with pytest.warns(
        bundles.BundleVersionWarning,
        match=rf"saved by Keras {re.escape(newer)}.*newer than the installed "
        rf"Keras {re.escape(keras.__version__)}",
    ) as caught:
        b = bundles.load_bundle(folder)
    assert len([w for w in caught if issubclass(w.category, bundles.BundleVersionWarning)]) == 1
    np.testing.assert_allclose(b.model.predict(X, verbose=0), bundle[1], atol=1e-6)
    # an older Keras is what Keras promises to read: no warning
    edit_meta(folder, versions={**versions, "keras": "3.0.0"})
    with no_bundle_warnings() as caught:
        warnings.simplefilter("always")
        bundles.load_bundle(folder)
    assert not [w for w in caught if issubclass(w.category, bundles.BundleVersionWarning)]


@pytest.mark.parametrize(
    "fmt, expected",
    [
        (
            "microclf-bundle/99",
            r"newer microclf \(format 99; this one reads up to 1\); upgrade "
            r"napari-microclf \(pip install -U napari-microclf\)",
        ),
        ("garbage", "has format 'garbage', not a microclf model"),
        ("microclf-bundle/two", "has format 'microclf-bundle/two', not a microclf model"),
        (3, "has format 3, not a microclf model"),
    ],
)
def test_a_format_this_version_cannot_read_is_refused(bundle, tmp_path, fmt, expected):
    folder = copy(bundle, tmp_path / "model")
    edit_meta(folder, format=fmt)
    for call in (bundles.read_meta, bundles.load_bundle):
        with pytest.raises(BundleError, match=expected):
            call(folder)
    # zip_bundle refuses to zip it; zipped by other means, the message names the zip (not
    # the cache folder it was extracted into)
    with pytest.raises(BundleError, match=expected):
        bundles.zip_bundle(folder, tmp_path / "model.zip")
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name in (bundles.MODEL_FILE, bundles.META_FILE):
            zf.write(folder / name, name)
    with pytest.raises(BundleError, match=expected) as err:
        bundles.load_bundle(zipped)
    assert f"microclf.json in {zipped}" in str(err.value)
    assert "xdg-cache" not in str(err.value)


# -- zipped bundles ------------------------------------------------------------------------


def test_zip_bundle_holds_the_bundle_only_and_loads_alike(bundle, tmp_path, cache_home):
    folder = copy(bundle, tmp_path / "model")
    bundles.write_bundle(
        folder,
        keras.models.load_model(folder / bundles.MODEL_FILE, compile=False),
        bundles.read_meta(folder),
        {"report.md": "# report\n", "notes-of-b.txt": "b"},
    )
    (folder / "notes.txt").write_text("the user's")
    (folder / "reports").mkdir()
    (folder / "reports" / "eval.md").write_text("an evaluation")
    (folder / MODEL_LOCK).write_text("{}")
    assert (folder / bundles.PREVIOUS_DIR).is_dir()
    out = bundles.zip_bundle(folder, tmp_path / "out" / "model.zip")
    assert out == (tmp_path / "out" / "model.zip").resolve() and out.is_file()
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
    assert names == sorted([bundles.MODEL_FILE, bundles.META_FILE, "report.md", "notes-of-b.txt"])
    assert os.listdir(tmp_path / "out") == ["model.zip"]  # no temporary file left

    meta = bundles.read_meta(out)
    assert meta["class_names"] == ["a", "b"]
    b = bundles.load_bundle(out)
    np.testing.assert_allclose(b.model.predict(X, verbose=0), bundle[1], atol=1e-6)
    assert b.source == out
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert b.path == (cache_home / sha).resolve()
    assert sorted(os.listdir(b.path)) == names
    # opened again: the same extraction, nothing new in the cache
    assert bundles.load_bundle(out).path == b.path and os.listdir(cache_home) == [sha]
    # zipped again over the old zip (atomically replaced), and from the model.keras path
    assert bundles.zip_bundle(folder / bundles.MODEL_FILE, out) == out
    assert os.listdir(tmp_path / "out") == ["model.zip"]


def test_predict_a_folder_with_a_zipped_bundle(bundle, tmp_path):
    import tifffile

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        tifffile.imwrite(images / f"img{i}.tif", rng.integers(0, 4096, (40, 48), np.uint16))
    zipped = bundles.zip_bundle(bundle[0], tmp_path / "model.zip")
    from_folder = predict_folder(bundle[0], images)
    from_zip = predict_folder(zipped, images, tmp_path / "out.csv")
    assert len(from_zip) == 3 and not from_zip.errors
    for p, q in zip(from_folder, from_zip, strict=True):
        assert (p.file, p.class_name) == (q.file, q.class_name)
        assert abs(p.confidence - q.confidence) <= 1e-6
    assert (tmp_path / "out.csv").is_file()


def test_evaluating_a_zipped_bundle_saves_its_report_beside_the_zip(bundle, tmp_path, cache_home):
    import tifffile

    from napari_microclf.core.evaluate import evaluate

    data = tmp_path / "labelled"
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            tifffile.imwrite(data / name / f"{i}.tif", rng.integers(0, 4096, (40, 48), np.uint16))
    zipped = bundles.zip_bundle(bundle[0], tmp_path / "shared.zip")
    report = evaluate(zipped, data, all_images=True)
    saved = Path(report["saved"])
    assert saved.parent == tmp_path / "shared-reports" / "reports" and saved.is_file()
    assert not list(cache_home.rglob("reports"))  # nothing hidden in the cache folder


def test_a_zip_of_the_folder_itself_opens_too(bundle, tmp_path):
    """``zip -r model.zip model/`` by hand: the bundle in one folder of the zip."""
    zipped = tmp_path / "by-hand.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for p in sorted(bundle[0].rglob("*")):
            if p.is_file():
                zf.write(p, "model/" + p.relative_to(bundle[0]).as_posix())
    b = bundles.load_bundle(zipped)
    np.testing.assert_allclose(b.model.predict(X, verbose=0), bundle[1], atol=1e-6)


def test_a_zip_that_is_no_bundle_names_the_file(bundle, tmp_path, cache_home):
    not_bundle = tmp_path / "photos.zip"
    with zipfile.ZipFile(not_bundle, "w") as zf:
        zf.writestr("holiday.jpg", b"jpeg")
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip at all")
    only_meta = tmp_path / "only-meta.zip"
    with zipfile.ZipFile(only_meta, "w") as zf:
        zf.write(bundle[0] / bundles.META_FILE, bundles.META_FILE)
    for path, why in [
        (not_bundle, "no microclf.json in it"),
        (garbage, "not a readable zip"),
        (only_meta, "no model.keras beside its microclf.json"),
    ]:
        for call in (bundles.read_meta, bundles.load_bundle):
            with pytest.raises(
                BundleError, match=re.escape(f"{path} is not a zipped microclf model ({why}")
            ):
                call(path)
    with pytest.raises(BundleError, match=r"zipped model .*missing\.zip does not exist"):
        bundles.load_bundle(tmp_path / "missing.zip")
    assert not list(cache_home.glob("*"))  # nothing extracted, no temporary folder left


def test_zip_bundle_refuses_what_is_no_bundle(bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="not a microclf model folder"):
        bundles.zip_bundle(empty, tmp_path / "x.zip")
    with pytest.raises(OutputError, match="is a folder; give the .zip file"):
        bundles.zip_bundle(bundle[0], tmp_path)
    zipped = bundles.zip_bundle(bundle[0], tmp_path / "model.zip")
    with pytest.raises(BundleError, match="already a zipped model"):
        bundles.zip_bundle(zipped, tmp_path / "again.zip")
    with pytest.raises(BundleError, match="zipped model: it keeps no previous model"):
        bundles.restore_previous(zipped)
    assert sorted(os.listdir(tmp_path)) == ["empty", "model.zip"]


def test_an_unwritable_cache_falls_back_to_the_temporary_folder(bundle, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv(settings.CACHE.name, str(blocked / "bundles"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    zipped = bundles.zip_bundle(bundle[0], tmp_path / "model.zip")
    b = bundles.load_bundle(zipped)
    assert b.path.parent == (tmp_path / "tmp" / "napari-microclf-bundles").resolve()
    np.testing.assert_allclose(b.model.predict(X, verbose=0), bundle[1], atol=1e-6)
