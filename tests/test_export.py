"""Export a model bundle: bioimage.io package (validated by bioimageio.spec), TensorFlow
SavedModel, ONNX (ONNX Runtime), the bundle as one zip; the CLI and the Qt row.

One tiny random bundle (32 px, weights=None) per module; each format is exported once and
its result shared by the tests that look at it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core import export as ex
from napari_microclf.core.bundle import load_bundle, write_bundle
from napari_microclf.core.errors import MicroclfError, OutputError
from napari_microclf.core.images import PreprocessSpec, preprocess, read_page
from napari_microclf.core.model import build_classifier

SIZE = 32
CLASSES = ["round", "long"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A two-class 32 px bundle whose probabilities depend on the image (a random base with
    a wide head), with a dataset, a test list and a report, as a training leaves them."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "data" / c).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 4000, (SIZE, SIZE)).astype(np.uint16)
            img[8:20, 4 + 8 * i : 14 + 8 * i] += 3000  # some structure
            tifffile.imwrite(root / "data" / c / f"{i}.tif", img)
    model = build_classifier(2, SIZE, None, fine_tune="all", augment=False, warn=False, seed=0)
    # a random base's pooled features hardly vary: a head scaled to their spread gives logits
    # that differ by a few units between images, as a trained head's do
    import keras

    spec = PreprocessSpec(SIZE)
    x = np.stack([preprocess(read_page(p), spec) for p in sorted((root / "data").rglob("*.tif"))])
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    f = np.asarray(pooled(x, training=False), dtype=np.float64)
    kernel = rng.normal(0, 1, (f.shape[1], 2)) * 3 / ((f - f.mean(0)).std() * np.sqrt(f.shape[1]))
    dense = model.get_layer("predictions")
    dense.kernel.assign(kernel.astype("float32"))
    dense.bias.assign((-f.mean(0) @ kernel).astype("float32"))
    split = {"test": [{"key": "long/1.tif", "sha1": "0", "group": "g"}], "val": [], "train": []}
    return write_bundle(
        root / "model",
        model,
        {
            "class_names": CLASSES,
            "preprocessing": spec.to_dict(),
            "data_dir": str(root / "data"),
            "metrics": {"accuracy": 0.5},
        },
        extra_files={"split.json": json.dumps(split), "report.md": "# Report\n\nTest: 50%\n"},
    )


@pytest.fixture(scope="module")
def bioimageio_zip(bundle):
    result = ex.export_model(bundle, "bioimageio", authors=["A. Tester"])
    print(
        f"bioimageio: {result.seconds:.1f} s, {result.size_bytes / 1e6:.1f} MB, "
        f"diff {result.max_abs_diff:.2g}"
    )
    return result


def _unzipped(zip_path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(dest)
    return dest


def test_bioimageio_package_validates(bioimageio_zip, bundle):
    from bioimageio.spec import load_description

    assert bioimageio_zip.path == bundle.parent / "model-bioimageio.zip"
    descr = load_description(bioimageio_zip.path, perform_io_checks=True)
    summary = descr.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    assert descr.type == "model" and str(descr.license) == "BSD-3-Clause"
    assert [a.name for a in descr.authors] == ["A. Tester"]
    assert descr.cite and "napari-microclf" in descr.cite[0].text
    (inp,), (out,) = descr.inputs, descr.outputs
    assert [str(a.id) for a in inp.axes] == ["batch", "y", "x", "channel"]
    assert [str(a.id) for a in out.axes] == ["batch", "channel"]
    assert out.axes[1].channel_names == CLASSES
    ops = [p.id for p in inp.preprocessing]
    assert ops[:4] == ["ensure_dtype", "scale_range", "scale_linear", "clip"]  # + ensure_dtype
    sr = inp.preprocessing[1].kwargs
    assert (sr.min_percentile, sr.max_percentile) == (1.0, 99.8)
    assert [str(a) for a in sr.axes] == ["y", "x"]  # per image and channel, as microclf
    assert inp.preprocessing[2].kwargs.gain == 255.0
    assert descr.weights.keras_v3 is not None
    names = set(zipfile.ZipFile(bioimageio_zip.path).namelist())
    assert {
        "weights.keras",
        "test_input.npy",
        "test_output.npy",
        "cover.png",
        "README.md",
        "rdf.yaml",
    } <= names
    readme = zipfile.ZipFile(bioimageio_zip.path).read("README.md").decode()
    assert "long/1.tif" in readme and "Test: 50%" in readme  # the example and the report


def test_bioimageio_weights_give_the_bundles_probabilities(bioimageio_zip, bundle, tmp_path):
    """The package's keras_v3 weights, after its preprocessing, on its test input: the
    bundle's own prediction of the same page (microclf's preprocessing)."""
    import keras

    folder = _unzipped(bioimageio_zip.path, tmp_path / "pkg")
    x = np.load(folder / "test_input.npy")
    expected_out = np.load(folder / "test_output.npy")
    page = read_page(Path(load_bundle(bundle).meta["data_dir"]) / "long" / "1.tif")
    assert x.shape == (1, SIZE, SIZE, 3) and np.array_equal(x[0, ..., 0], page[..., 0])
    weights = keras.saving.load_model(folder / "weights.keras", compile=False, safe_mode=True)
    got = np.asarray(
        weights(ex.bioimageio_preprocess(x, PreprocessSpec(SIZE).resolved(page.dtype)))
    )
    b = load_bundle(bundle)
    own = np.asarray(b.model(preprocess(page, b.preprocess)[None], training=False))
    print(f"keras_v3 vs bundle: {np.abs(got - own).max():.2g}")
    assert np.abs(got - own).max() <= 1e-5
    assert np.abs(got - expected_out).max() <= 1e-6
    assert abs(own[0, 0] - 0.5) > 1e-3  # a model whose output depends on the image


def test_bioimageio_weights_resize_any_image(bioimageio_zip, bundle, tmp_path):
    """The weights take any size (the resize is inside): a 72 x 50 image gives probabilities
    close to microclf's (scikit-image's resize differs slightly from Keras')."""
    import keras

    folder = _unzipped(bioimageio_zip.path, tmp_path / "pkg")
    weights = keras.saving.load_model(folder / "weights.keras", compile=False, safe_mode=True)
    rng = np.random.default_rng(1)
    page = rng.integers(0, 4000, (72, 50)).astype(np.uint16)
    page[20:50, 10:30] += 3000
    x = np.repeat(page[None, ..., None], 3, axis=-1).astype(np.float32)
    got = np.asarray(
        weights(ex.bioimageio_preprocess(x, PreprocessSpec(SIZE).resolved(page.dtype)))
    )
    b = load_bundle(bundle)
    own = np.asarray(b.model(preprocess(page, b.preprocess)[None], training=False))
    print(f"72x50 image, resize inside vs microclf: {np.abs(got - own).max():.3g}")
    assert got.shape == (1, 2) and np.allclose(got.sum(), 1.0, atol=1e-5)
    assert np.abs(got - own).max() < 0.1


def test_savedmodel_reloads_with_the_same_probabilities(bundle, tmp_path):
    import tensorflow as tf

    result = ex.export_model(bundle, "savedmodel", tmp_path / "sm")
    print(
        f"savedmodel: {result.seconds:.1f} s, {result.size_bytes / 1e6:.1f} MB, "
        f"diff {result.max_abs_diff:.2g}"
    )
    loaded = tf.saved_model.load(str(result.path))
    b = load_bundle(bundle)
    x = np.random.default_rng(2).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    got = loaded.serve(tf.constant(x)).numpy()
    assert np.abs(got - np.asarray(b.model(x, training=False))).max() <= 1e-5
    assert json.loads((result.path / "microclf.json").read_text())["class_names"] == CLASSES
    assert not list(tmp_path.glob(".sm*"))  # no temporary left


def test_onnx_has_only_the_image_input_and_the_same_probabilities(bundle, tmp_path):
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    result = ex.export_model(bundle, "onnx", tmp_path / "m.onnx")
    print(
        f"onnx: {result.seconds:.1f} s, {result.size_bytes / 1e6:.1f} MB, "
        f"diff {result.max_abs_diff:.2g}"
    )
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    b = load_bundle(bundle)
    x = np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    got = session.run(None, {"image": x})[0]
    assert np.abs(got - np.asarray(b.model(x, training=False))).max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_onnx_without_tf2onnx_says_what_to_install(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "onnx_available", lambda: False)
    with pytest.raises(ex.ExportError, match=r'pip install "napari-microclf\[onnx\]"'):
        ex.export(bundle, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_zip_is_the_bundle_and_destinations_are_checked(bundle, tmp_path):
    out = ex.export(bundle, "zip", tmp_path / "m.zip")
    names = zipfile.ZipFile(out).namelist()
    assert "model.keras" in names and "microclf.json" in names
    with pytest.raises(OutputError, match="exists.*--overwrite"):
        ex.export(bundle, "zip", out)
    assert ex.export(bundle, "zip", out, overwrite=True) == out
    with pytest.raises(OutputError, match="does not exist"):
        ex.export(bundle, "zip", tmp_path / "nowhere" / "m.zip")
    with pytest.raises(MicroclfError, match="unknown export format 'tiff'"):
        ex.export(bundle, "tiff")
    assert ex.default_out(bundle, "savedmodel") == bundle.parent / "model-savedmodel"
    assert ex.default_out(bundle, "onnx") == bundle.parent / "model.onnx"


def test_a_zipped_model_exports_too(bundle, tmp_path):
    """A model shared as one zip exports as its folder does, named after the zip."""
    from bioimageio.spec import load_description

    zipped = ex.export(bundle, "zip", tmp_path / "shared.zip")
    page = Path(load_bundle(bundle).meta["data_dir"]) / "round" / "0.tif"
    out = ex.export(zipped, "bioimageio", example=page)
    assert out == tmp_path / "shared-bioimageio.zip"
    descr = load_description(out, perform_io_checks=False)
    assert descr.name == "microclf shared" and descr.outputs[0].axes[1].channel_names == CLASSES


def test_without_the_dataset_the_example_must_be_given(bundle, tmp_path):
    import dataclasses

    b = load_bundle(bundle)
    moved = dataclasses.replace(b, meta={**b.meta, "data_dir": str(tmp_path / "gone")})
    with pytest.raises(ex.ExportError, match=r"--example IMAGE"):
        ex.example_page(moved)


def test_cli_export(bundle, tmp_path, capsys):
    out = tmp_path / "cli.zip"
    assert cli_main(["export", str(bundle), "--format", "zip", "--out", str(out)]) == 0
    assert out.is_file() and "Exported" in capsys.readouterr().out
    assert cli_main(["export", str(bundle), "--format", "zip", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("microclf: error: ") and "exists" in err[0]
    assert (
        cli_main(
            [
                "export",
                str(tmp_path / "none"),
                "--format",
                "savedmodel",
                "--out",
                str(tmp_path / "sm"),
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.startswith("microclf: error: ")


def test_export_row(bundle, tmp_path, qtbot):
    from napari_microclf._qt.export import ExportRow

    row = ExportRow()
    qtbot.addWidget(row)
    assert not row.button.isEnabled()
    row.set_model(bundle)
    row.set_format("zip")
    assert row.button.isEnabled() and row.fmt == "zip"
    with qtbot.waitSignal(row.exported, timeout=60_000) as done:
        row.export_to(tmp_path / "row.zip")
    assert done.args[0].path == tmp_path / "row.zip" and done.args[0].path.is_file()
    qtbot.waitUntil(lambda: row.button.isEnabled(), timeout=10_000)
    assert row.button.text() == "Export..."
    with qtbot.waitSignal(row.failed, timeout=60_000) as failed:
        row.export_to(tmp_path / "row.zip")  # exists: an error notification
    assert isinstance(failed.args[0], MicroclfError) and "exists" in str(failed.args[0])
    qtbot.waitUntil(lambda: row.button.isEnabled(), timeout=10_000)


def test_export_row_asks_where_with_the_default_name(bundle, tmp_path, qtbot, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    from napari_microclf._qt.export import ExportRow

    asked = []

    def save_as(parent, title, suggested):
        asked.append(suggested)
        return str(tmp_path / "picked.zip"), ""

    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_as)
    row = ExportRow()
    qtbot.addWidget(row)
    row.set_model(bundle)
    row.set_format("zip")
    with qtbot.waitSignal(row.exported, timeout=60_000):
        row.button.click()
    assert asked == [str(bundle.parent / "model.zip")]
    assert (tmp_path / "picked.zip").is_file()
    qtbot.waitUntil(lambda: row.button.isEnabled(), timeout=10_000)
