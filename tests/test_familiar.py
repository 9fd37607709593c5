"""Unfamiliar images: the bundle's description of its training data in feature space.

One frozen, pretrained Lite0 (ImageNet features make feature-space statistics meaningful) is
trained on the sample data at 64 px; its own test images must stay familiar while
scikit-image's bundled images and noise are flagged, with a threshold taken from the
validation images alone.
"""

import csv
import json
import shutil
import warnings

import numpy as np
import pytest

from napari_microclf.core import familiar
from napari_microclf.core.csv_format import write_csv
from napari_microclf.core.familiar import (
    FAMILIARITY_FILE,
    Familiarity,
    fit_familiarity,
    unit_length,
)
from napari_microclf.core.folder_runs import predict_folder
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.sample import CLASSES
from napari_microclf.core.train import Message


def _unrelated() -> dict[str, np.ndarray]:
    """Images unlike fluorescent cells: scikit-image's own (no download) and noise."""
    from skimage import data

    rng = np.random.default_rng(0)
    return {
        "camera": data.camera(),
        "coins": data.coins(),
        "brick": data.brick(),
        "cell": data.cell(),
        "uniform noise": rng.random((96, 96)),
        "12-bit noise": rng.integers(0, 4096, (128, 128)).astype(np.uint16),
    }


def _scores(predictor, paths) -> np.ndarray:
    return np.array([p.unfamiliar_score for f in paths for p in predictor.predict_file(f)])


def test_own_test_images_are_familiar_and_unrelated_images_are_flagged(lite0):
    result, files = lite0.result, lite0.files
    predictor = Predictor(result.bundle)
    assert predictor.familiarity is not None
    test = _scores(predictor, files["test"])
    assert len(test) == 12
    assert np.mean(test <= 1) >= 0.9, test
    others = {name: predictor.predict_array(a)[0] for name, a in _unrelated().items()}
    print(
        f"test images: scores {np.round(np.sort(test), 2)}; unrelated: "
        + ", ".join(f"{n} {p.unfamiliar_score:.2f}" for n, p in others.items())
    )
    for name, p in others.items():
        assert p.unfamiliar and p.unfamiliar_score > 1, (name, p.unfamiliar_score)
        assert p.label(0.0) == "unfamiliar"  # whatever the confidence
    # unrelated images lie well beyond the farthest test image, not at the edge
    assert min(p.unfamiliar_score for p in others.values()) > 1.3 * test.max()
    # the test report lists the test images beyond the threshold (report.html shows them)
    report = json.loads((result.bundle / "report.json").read_text())
    beyond = {str(f): s for f, s in zip(files["test"], test, strict=True) if s > 1}
    assert {u["file"]: u["score"] for u in report["unfamiliar"]} == pytest.approx(beyond, abs=1e-3)
    assert report["unfamiliar_threshold"] == 1.0


def test_the_threshold_is_the_validation_images_99th_percentile(lite0):
    result, updates, files = lite0.result, lite0.updates, lite0.files
    meta = json.loads((result.bundle / "microclf.json").read_text())
    info = meta["familiarity"]
    assert FAMILIARITY_FILE in meta["files"] and (result.bundle / FAMILIARITY_FILE).is_file()
    assert info["method"] == "mahalanobis" and info["quantile"] == 0.99
    n_val = len(files["val"])
    assert n_val >= familiar.MIN_CALIBRATION
    assert info["calibration"] == {"source": "validation", "n": n_val, "n_validation": n_val}
    # recomputed from the validation images through the saved model: the same number
    predictor = Predictor(result.bundle)
    distances = _scores(predictor, files["val"]) * predictor.familiarity.threshold
    assert info["threshold"] == pytest.approx(np.quantile(distances, 0.99), rel=1e-4)
    assert np.sum(distances > info["threshold"]) <= max(1, round(0.01 * n_val))
    # ... and not from the test images (their 99th percentile is another number)
    test = _scores(predictor, files["test"]) * predictor.familiarity.threshold
    assert np.quantile(test, 0.99) != pytest.approx(info["threshold"], rel=1e-3)
    size = (result.bundle / FAMILIARITY_FILE).stat().st_size
    print(
        f"{FAMILIARITY_FILE}: {size / 1e3:.0f} kB for {predictor.familiarity.n_features} "
        f"features, {info['components']} components"
    )
    assert size < 1_000_000
    said = [u.text for u in updates if isinstance(u, Message) and "Unfamiliar" in u.text]
    assert len(said) == 1 and f"{info['threshold']:.2f}" in said[0]


def test_the_csv_has_the_score_and_the_class_says_unfamiliar(lite0, tmp_path, capsys):
    import imageio.v3 as iio
    from skimage import data

    result, files = lite0.result, lite0.files
    folder = tmp_path / "images"
    folder.mkdir()
    for f in files["test"][:3]:
        shutil.copy(f, folder / f.name.replace("sample", f.parent.name))
    iio.imwrite(folder / "z_camera.png", data.camera())
    (folder / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "folder.csv"
    run = predict_folder(result.bundle, folder, out, threshold=0.0)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "file",
        "page",
        "class",
        "confidence",
        *(f"p_{c}" for c in CLASSES),
        "unfamiliar",
        "status",
        "error",
    ]
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["z_camera.png"]["class"] == "unfamiliar"
    assert float(by_name["z_camera.png"]["unfamiliar"]) > 1
    assert (
        by_name["zz_broken.png"]["status"] == "error"
        and by_name["zz_broken.png"]["unfamiliar"] == ""
    )
    for p in run.predictions:
        row = by_name[p.file.rsplit("/", 1)[-1]]
        assert float(row["unfamiliar"]) == pytest.approx(p.unfamiliar_score, abs=1e-4)
        assert row["class"] == p.label(0.0)
    # write_csv (the widget's export) adds the column for pages that have a score
    path = tmp_path / "pages.csv"
    write_csv(run.predictions, path, CLASSES)
    with path.open() as f:
        assert next(csv.reader(f))[-1] == "unfamiliar"
    # microclf predict prints the label and the score
    from napari_microclf.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["predict", str(result.bundle), str(folder / "z_camera.png")]) == 0
    (line,) = [li for li in capsys.readouterr().out.splitlines() if "z_camera" in li]
    score = float(by_name["z_camera.png"]["unfamiliar"])
    assert line.split("\t")[2] == "unfamiliar" and line.endswith(f"\tunfamiliar {score:.2f}")


def test_a_bundle_without_the_description_predicts_without_a_score(lite0, tmp_path):
    result, files = lite0.result, lite0.files
    old = tmp_path / "old"
    shutil.copytree(result.bundle, old)
    (old / FAMILIARITY_FILE).unlink()
    meta = json.loads((old / "microclf.json").read_text())
    listed = meta.pop("familiarity")
    meta["files"].remove(FAMILIARITY_FILE)
    (old / "microclf.json").write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        predictor = Predictor(old)
    assert not [w for w in said if "unfamiliar" in str(w.message)]  # an old bundle is normal
    assert predictor.familiarity is None
    pages = list(predictor.predict_file(files["test"][0]))
    camera = predictor.predict_array(_unrelated()["camera"])[0]
    for p in [*pages, camera]:
        assert p.unfamiliar_score is None and not p.unfamiliar and p.label() == p.class_name
    path = tmp_path / "old.csv"
    write_csv(pages, path, CLASSES)
    with path.open() as f:
        assert next(csv.reader(f)) == [
            "file",
            "page",
            "class",
            "confidence",
            *(f"p_{c}" for c in CLASSES),
        ]
    # listed in the metadata but the file is gone: said, and the classes still come
    meta["familiarity"] = listed
    (old / "microclf.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no unfamiliar score"):
        predictor = Predictor(old)
    assert predictor.predict_file(files["test"][0]).__next__().unfamiliar_score is None


def test_without_cached_features_the_models_own_base_describes_the_images(tmp_path):
    """Without cached features (fine-tuning, --no-cache) the images go through the final
    model's own base; with few validation images out-of-fold training distances join the
    calibration; the written bundle's Predictor sees the same features. (A random model, not
    a training: fine-tuning compiles the whole network's gradients for minutes.)"""
    from napari_microclf.core.bundle import write_bundle
    from napari_microclf.core.images import PreprocessSpec
    from napari_microclf.core.model import LITE0, build_classifier

    model = build_classifier(3, 32, None, backbone=LITE0, fine_tune="all", augment=False, seed=0)
    rng = np.random.default_rng(3)
    images = {
        "train": rng.uniform(0, 255, (15, 32, 32, 3)).astype(np.float32),
        "val": rng.uniform(0, 255, (6, 32, 32, 3)).astype(np.float32),
    }
    y = {"train": np.arange(15) % 3, "val": np.arange(6) % 3}
    fam, seconds = familiar.fit_for_training(model, images, y, 3, cached=False, batch_size=8)
    assert fam.calibration == {
        "source": "validation and out-of-fold training",
        "n": 21,
        "n_validation": 6,
    }
    bundle = write_bundle(
        tmp_path / "m",
        model,
        {
            "class_names": ["a", "b", "c"],
            "preprocessing": PreprocessSpec(32).to_dict(),
            "familiarity": fam.meta(),
        },
        {FAMILIARITY_FILE: fam.to_bytes()},
    )
    predictor = Predictor(bundle)
    _, scores = predictor._outputs(images["val"])
    expected = fam.distances(familiar.pooled_features(model, images["val"])) / fam.threshold
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


# -- the statistics, without TensorFlow ----------------------------------------------------


def test_distances_are_the_shrunk_covariances_mahalanobis_distances():
    rng = np.random.default_rng(1)
    dim, n = 40, 90
    labels = np.arange(n) % 3
    feats = rng.normal(size=(n, dim)) * np.linspace(0.2, 2, dim) + 3 * np.eye(dim)[labels]
    fam = familiar.describe(feats, labels, 3, components=dim)
    x = unit_length(feats)
    means = np.stack([x[labels == c].mean(0) for c in range(3)])
    centred = x - means[labels]
    cov = centred.T @ centred / n
    a = fam.shrinkage
    assert 0 < a < 1
    precision = np.linalg.inv((1 - a) * cov + a * np.trace(cov) / dim * np.eye(dim))
    query = unit_length(rng.normal(size=(7, dim)))
    expected = np.sqrt(
        np.min([np.einsum("ij,jk,ik->i", query - m, precision, query - m) for m in means], axis=0)
    )
    np.testing.assert_allclose(fam.distances(query), expected, rtol=1e-8)
    # truncated to fewer components, the rest at their mean variance: close, not equal
    small = familiar.describe(feats, labels, 3, components=10)
    assert small.components.shape == (10, dim)
    np.testing.assert_allclose(small.distances(query), expected, rtol=0.5)


def test_few_validation_images_add_out_of_fold_training_distances(tmp_path):
    rng = np.random.default_rng(2)
    feats, labels = rng.normal(size=(60, 3, 16)) + 5, np.arange(60) % 2
    val = rng.normal(size=(30, 16)) + 5
    enough = fit_familiarity(feats, labels, 2, val, components=8)
    assert enough.calibration == {"source": "validation", "n": 30, "n_validation": 30}
    assert enough.threshold == pytest.approx(
        np.quantile(familiar.describe(feats, labels, 2, 8).distances(val), 0.99)
    )
    few = fit_familiarity(feats, labels, 2, val[:4], components=8)
    assert few.calibration == {
        "source": "validation and out-of-fold training",
        "n": 64,
        "n_validation": 4,
    }
    none = fit_familiarity(feats, labels, 2, None, components=8)
    assert none.calibration["source"] == "out-of-fold training"
    # stored and read back: the same scores
    path = tmp_path / FAMILIARITY_FILE
    path.write_bytes(enough.to_bytes())
    back = Familiarity.from_file(path)
    np.testing.assert_allclose(back.scores(val), enough.scores(val), rtol=1e-5)


def test_the_predict_widget_marks_unfamiliar_pages(lite0, make_napari_viewer, qtbot, docked):
    import tifffile
    from skimage import data

    from napari_microclf._qt.predict import UNFAMILIAR_HEADER

    result, files = lite0.result, lite0.files
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(files["test"][0]), name="cells")
    viewer.add_image(data.camera(), name="camera")
    widget = docked(viewer, "Predict")
    widget.set_bundle(result.bundle)
    widget.threshold.setValue(0.0)
    widget.choose(["cells", "camera"])
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    cells, camera = (viewer.layers[f"{n} classes"].features for n in ("cells", "camera"))
    assert camera["label"][0] == "unfamiliar" and camera["unfamiliar"][0] > 1
    assert cells["label"][0] == cells["class"][0] and cells["unfamiliar"][0] <= 1
    header = widget.table.horizontalHeaderItem(4).text()
    table = {
        widget.table.item(r, 0).text(): (
            widget.table.item(r, 2).text(),
            float(widget.table.item(r, 4).text()),
        )
        for r in range(widget.table.rowCount())
    }
    # the score column (its header renamed in c09c421: "unfamiliar (>1: unlike training)")
    assert header == UNFAMILIAR_HEADER and table["camera"][0] == "unfamiliar"
    assert table["camera"][1] == pytest.approx(camera["unfamiliar"][0], abs=0.01)
    pages = viewer.layers["camera"].metadata["microclf"]["predictions"]["pages"]
    assert pages[0]["unfamiliar_score"] == pytest.approx(camera["unfamiliar"][0], abs=1e-3)
    viewer.layers.selection.active = viewer.layers["camera"]
    widget.labels.update_in_view()
    assert "camera: unfamiliar" in widget.in_view.text()
    assert "unlike the training images" in widget.in_view.text()
