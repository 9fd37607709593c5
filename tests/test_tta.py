"""Test-time augmentation (TTA): each page classified as itself and its horizontal, vertical
and double flips, the four probability vectors averaged.

The probabilities are checked against the Keras model run here on the four flipped inputs;
a model that sees orientation (a dense layer on the pixels) must answer differently with TTA
and identically on a page that all flips leave unchanged; the CLI's ``--tta`` writes the
averaged probabilities; the training report and ``evaluate(tta=True)`` score what the
Predictor's TTA predicts.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core.bundle import write_bundle
from napari_microclf.core.evaluate import evaluate
from napari_microclf.core.folder_runs import predict_folder
from napari_microclf.core.images import PreprocessSpec, open_image, preprocess
from napari_microclf.core.predict import predict
from napari_microclf.core.predictor import Predictor
from napari_microclf.core.report import tta_summary
from napari_microclf.core.sample import write_sample
from napari_microclf.core.train import Message, TrainConfig, train
from napari_microclf.core.tta import TTA_VIEWS, flip_views, mean_of_views, tta_probabilities

RNG = np.random.default_rng(7)
SIZE = 32
NAMES = ["a", "b", "c"]


def _flips(x: np.ndarray) -> list[np.ndarray]:
    """One ``(Y, X, C)`` model input and its flips, written out here on their own."""
    return [x, np.flip(x, 1), np.flip(x, 0), np.flip(x, (0, 1))]


def _expected(model, pages) -> tuple[np.ndarray, np.ndarray]:
    """(mean over the four flips, plain) of the model's outputs, computed here: each page's
    flips stacked by :func:`_flips` and run through the Keras model directly."""
    spec = PreprocessSpec(model.input_shape[1])
    views = np.stack([v for page in pages for v in _flips(preprocess(page, spec))])
    out = np.asarray(model(views, training=False)).reshape(len(pages), 4, -1)
    return out.mean(axis=1), out[:, 0]


def _probs(predictions) -> np.ndarray:
    return np.array([[p.probabilities[n] for n in p.probabilities] for p in predictions])


def _page(h=SIZE, w=SIZE) -> np.ndarray:
    return RNG.integers(0, 4000, (h, w)).astype(np.uint16)


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    """A bundle whose model sees where each pixel is: a dense layer on the flattened input."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    init = keras.initializers.RandomNormal(stddev=0.05, seed=0)
    outputs = keras.layers.Dense(len(NAMES), activation="softmax", kernel_initializer=init)(x)
    return write_bundle(
        tmp_path_factory.mktemp("oriented") / "m",
        keras.Model(inputs, outputs),
        {"class_names": NAMES, "preprocessing": PreprocessSpec(SIZE).to_dict()},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny EfficientNet trained on cached features (frozen base: the cached-feature test
    path), with a familiarity description."""
    root = tmp_path_factory.mktemp("tta")
    data = write_sample(root / "s", n_per_class=20, size=48, seed=2)["dataset"]
    updates = []
    result = train(
        TrainConfig(
            str(data),
            str(root / "model"),
            epochs=1,
            batch_size=8,
            image_size=SIZE,
            weights=None,
            fine_tune=0,
            augment=False,
            early_stopping=False,
            seed=0,
        ),
        on_update=updates.append,
    )
    own = json.loads((result.bundle / "split.json").read_text())
    test = [(data / e["key"], e["key"].split("/")[0]) for e in own["test"]]
    return result, updates, test


@pytest.fixture(scope="module")
def test_predictions(trained):
    """The test images' pages, and the Predictor's plain and TTA predictions of them."""
    result, _, test = trained
    predictor = Predictor(result.bundle, batch_size=4)  # 6 test pages: a partial batch
    pages, truth = [], []
    for f, c in test:
        with open_image(f) as img:
            pages += [img.page(i) for i in range(len(img))]
            truth += [c] * len(img)
    files = [f for f, _ in test]
    return {
        "predictor": predictor,
        "pages": pages,
        "truth": truth,
        "plain": list(predictor.predict_paths(files)),
        "tta": list(predictor.predict_paths(files, tta=True)),
    }


def _accuracy_bounds(predictions, truth) -> tuple[float, float]:
    """The accuracy of ``predictions``, widened by the pages whose top two probabilities are
    too close for two runs of the same model to be sure to agree on the class."""
    right = ambiguous = 0
    for p, t in zip(predictions, truth, strict=True):
        top = sorted(p.probabilities.values())[-2:]
        if top[1] - top[0] < 1e-4:
            ambiguous += 1
        else:
            right += p.class_name == t
    n = len(truth)
    return right / n, (right + ambiguous) / n


# -- the views ------------------------------------------------------------------------------


def test_flip_views_lays_out_each_view_of_the_batch_in_turn():
    x = RNG.random((3, 5, 5, 3)).astype(np.float32)
    views = flip_views(x)
    assert views.shape == (TTA_VIEWS * 3, 5, 5, 3)
    for i in range(3):
        for v, expected in enumerate(_flips(x[i])):
            np.testing.assert_array_equal(views[v * 3 + i], expected)
    np.testing.assert_allclose(
        mean_of_views(np.stack([np.full(2, v) for v in [0, 0, 4, 4, 8, 8, 12, 12]])),
        [[6, 6], [6, 6]],
    )


# -- probabilities ----------------------------------------------------------------------------


def test_tta_probabilities_are_the_mean_over_the_four_flipped_inputs(oriented):
    predictor = Predictor(oriented, batch_size=2)  # 5 pages: full and partial batches
    pages = [_page() for _ in range(4)] + [_page(40, 56)]
    expected, plain = _expected(predictor.bundle.model, pages)
    got = predictor.predict_array(np.stack(pages[:4]), page_axis=0, tta=True)
    got += predictor.predict_array(pages[4], tta=True)
    np.testing.assert_allclose(_probs(got), expected, atol=1e-5)
    assert [p.class_name for p in got] == [NAMES[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in got], expected.max(1), atol=1e-5)
    assert all(p.tta for p in got)
    without = predictor.predict_array(np.stack(pages[:4]), page_axis=0)
    np.testing.assert_allclose(_probs(without), plain[:4], atol=1e-5)
    assert not any(p.tta for p in without)
    # the batched helper of evaluate and train: the same mean
    x = np.stack([preprocess(p, predictor.spec) for p in pages])
    mean, unflipped = tta_probabilities(predictor.bundle.model, x, 2, with_plain=True)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    np.testing.assert_allclose(unflipped, plain, atol=1e-5)


def test_a_model_that_sees_orientation_answers_differently_with_tta(oriented):
    predictor = Predictor(oriented)
    asymmetric = _page()
    asymmetric[:, : SIZE // 2] //= 4  # a dim left half
    tta, plain = (predictor.predict_array(asymmetric, tta=t)[0] for t in (True, False))
    difference = np.abs(_probs([tta]) - _probs([plain])).max()
    assert difference > 1e-3, difference
    # a page that every flip leaves unchanged: the four views are one, TTA changes nothing
    q = _page(SIZE // 2, SIZE // 2)
    top = np.concatenate([q, q[:, ::-1]], axis=1)
    symmetric = np.concatenate([top, top[::-1]], axis=0)
    tta, plain = (predictor.predict_array(symmetric, tta=t)[0] for t in (True, False))
    np.testing.assert_allclose(_probs([tta]), _probs([plain]), atol=1e-5)


def test_every_entry_point_passes_tta_on(oriented, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pages = [_page() for _ in range(3)]
    tifffile.imwrite(
        folder / "stack.tif",
        np.stack(pages[:2]),
        metadata={"axes": "ZYX"},
        photometric="minisblack",
    )
    tifffile.imwrite(folder / "one.tif", pages[2])
    predictor = Predictor(oriented)
    expected = _probs(predictor.predict_array(np.stack(pages), page_axis=0, tta=True))
    in_order = lambda ps: _probs(sorted(ps, key=lambda p: (p.file.endswith("one.tif"), p.page)))  # noqa: E731
    files = [folder / "stack.tif", folder / "one.tif"]
    for got in (
        predict(oriented, folder, tta=True),
        predict_folder(predictor, folder, tta=True),
        list(predictor.predict_paths(files, tta=True)),
        [p for f in files for p in predict(predictor, f, tta=True)],
    ):
        assert all(p.tta for p in got)
        np.testing.assert_allclose(in_order(got), expected, atol=1e-5)


def test_the_unfamiliar_score_stays_the_unflipped_pages(test_predictions):
    plain, tta = test_predictions["plain"], test_predictions["tta"]
    assert test_predictions["predictor"].familiarity is not None
    np.testing.assert_allclose(
        [p.unfamiliar_score for p in tta], [p.unfamiliar_score for p in plain], rtol=1e-4
    )
    # and the probabilities are the full EfficientNet's mean over the flips
    model = test_predictions["predictor"].bundle.model
    expected, unflipped = _expected(model, test_predictions["pages"])
    np.testing.assert_allclose(_probs(tta), expected, atol=1e-5)
    np.testing.assert_allclose(_probs(plain), unflipped, atol=1e-5)


# -- the CLI --------------------------------------------------------------------------------


def _csv_probs(path) -> np.ndarray:
    with open(path, encoding="utf-8", newline="") as f:
        return np.array([[float(r["p_" + n]) for n in NAMES] for r in csv.DictReader(f)])


def test_cli_tta_writes_the_averaged_probabilities(oriented, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    pages = [_page(), _page(48, 40)]
    for i, page in enumerate(pages):
        page[:, : page.shape[1] // 3] //= 5  # orientation matters
        tifffile.imwrite(folder / f"{i}.tif", page)
    for flag in ([], ["--tta"]):
        assert (
            cli_main(
                [
                    "predict",
                    str(oriented),
                    str(folder),
                    "--csv",
                    str(tmp_path / f"out{len(flag)}.csv"),
                    *flag,
                ]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "test-time augmentation" in out
    expected, plain = _expected(Predictor(oriented).bundle.model, pages)
    np.testing.assert_allclose(_csv_probs(tmp_path / "out1.csv"), expected, atol=1e-4)
    np.testing.assert_allclose(_csv_probs(tmp_path / "out0.csv"), plain, atol=1e-4)
    assert (
        np.abs(_csv_probs(tmp_path / "out1.csv") - _csv_probs(tmp_path / "out0.csv")).max() > 1e-3
    )


# -- reports --------------------------------------------------------------------------------


def test_the_training_report_has_the_test_accuracy_with_flips(trained, test_predictions):
    result, updates, test = trained
    report = result.report
    tta = report["tta"]
    assert 0 <= tta["accuracy"] <= 1 and tta["n"] == report["n"] == len(test)
    assert tta["views"] == 4 and tta["plain_accuracy"] == report["accuracy"]
    assert not tta["in_metrics"] and tta["seconds"] >= 0
    # it is the accuracy of what the Predictor's TTA predicts for the test images
    low, high = _accuracy_bounds(test_predictions["tta"], test_predictions["truth"])
    assert low - 1e-4 <= tta["accuracy"] <= high + 1e-4
    saved = json.loads((result.bundle / "report.json").read_text())
    assert saved["tta"] == tta
    md = (result.bundle / "report.md").read_text()
    assert (
        f"Accuracy with flips (TTA: mean of 4 flipped views per image): {tta['accuracy']:.2%}" in md
    )
    html = (result.bundle / "report.html").read_text()
    assert "With flips (test-time augmentation" in html and f"{tta['accuracy']:.2%}" in html
    texts = [u.text for u in updates if isinstance(u, Message)]
    assert any(
        t.startswith(
            f"Test accuracy with flips (TTA): {tta['accuracy']:.4f} (plain {report['accuracy']:.4f}"
        )
        for t in texts
    ), texts


def test_an_empty_test_set_has_no_tta_accuracy():
    assert tta_summary(None, [], np.zeros((0, 3)), in_metrics=False) is None


def test_evaluate_with_tta_scores_the_averaged_probabilities(
    trained, test_predictions, monkeypatch, capsys
):
    result, _, _ = trained
    report = evaluate(result.bundle, tta=True)
    assert "TTA" in report["title"] and any("flips" in n for n in report["notes"])
    tta = report["tta"]
    assert tta["in_metrics"] and tta["accuracy"] == report["accuracy"]
    truth = test_predictions["truth"]
    for key, preds in (
        ("accuracy", test_predictions["tta"]),
        ("plain_accuracy", test_predictions["plain"]),
    ):
        low, high = _accuracy_bounds(preds, truth)
        assert low - 1e-4 <= tta[key] <= high + 1e-4, key
    saved = Path(report["saved"]).read_text(encoding="utf-8")
    assert f"Accuracy: **{report['accuracy']:.2%}** with flips (TTA" in saved
    assert f"plain {tta['plain_accuracy']:.2%}" in saved
    # the CLI's --tta reaches evaluate (the evaluation itself is the one above)
    from napari_microclf.core import evaluate as evaluate_mod

    calls = []
    monkeypatch.setattr(
        evaluate_mod, "evaluate", lambda *a, **kw: calls.append(kw) or {**report, "saved": None}
    )
    assert cli_main(["evaluate", str(result.bundle), "--tta"]) == 0
    assert cli_main(["evaluate", str(result.bundle)]) == 0
    assert [kw["tta"] for kw in calls] == [True, False]
    assert "with flips (TTA" in capsys.readouterr().out


def test_batched_tta_through_keras_predict_gives_the_same_mean(oriented):
    """Many batches go through Keras ``predict`` rather than eager calls: the same numbers."""
    model = Predictor(oriented).bundle.model
    pages = [_page() for _ in range(5)]
    x = np.stack([preprocess(p, PreprocessSpec(SIZE)) for p in pages])
    expected, _ = _expected(model, pages)
    for eager in (True, False):
        np.testing.assert_allclose(tta_probabilities(model, x, 2, eager=eager), expected, atol=1e-5)


def test_predict_widgets_flip_option_runs_layers_and_folders_with_tta(
    make_napari_viewer, qtbot, oriented, tmp_path, docked
):
    """Predict's "Average over flips": the layer's probabilities and the folder CSV's are the
    averaged ones, and unchecked they are the plain ones."""
    page = _page()
    tifffile.imwrite(tmp_path / "one.tif", page)
    viewer = make_napari_viewer()
    viewer.add_image(page, name="one")
    widget = docked(viewer, "Predict")
    widget.set_bundle(oriented)
    want = {}
    for tta in (False, True):
        want[tta] = _probs(Predictor(oriented).predict_array(page, tta=tta))[0]
    assert np.abs(want[True] - want[False]).max() > 1e-3
    for tta in (False, True):
        widget.tta.setChecked(tta)
        widget.choose(["one"])
        widget.run()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
        got = _probs(widget.results["one"])[0]
        np.testing.assert_allclose(got, want[tta], atol=1e-5)
        out = tmp_path / f"folder-{tta}.csv"
        widget.classify_folder(tmp_path, out)
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
        row = next(csv.DictReader(out.open()))
        np.testing.assert_allclose([float(row["p_" + n]) for n in NAMES], want[tta], atol=1e-4)
