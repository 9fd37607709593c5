"""Reading pages from every supported layout, and the preprocessing the model sees."""

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_microclf.core.images import (
    ImageReadError,
    PreprocessSpec,
    normalize_percentile,
    open_image,
    parse_channel_map,
    preprocess,
    read_header,
    select_channels,
    shape_problem,
)


def _stack(shape, dtype=np.uint16):
    return np.random.default_rng(0).integers(0, 4000, shape).astype(dtype)


def test_imagej_hyperstack_pages_and_channels(tmp_path):
    a = _stack((4, 2, 20, 30))  # Z, C, Y, X
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, a, imagej=True, metadata={"axes": "ZCYX"})
    with open_image(path) as f:
        assert (f.info.n_pages, f.info.n_channels, f.info.channel_axis) == (4, 2, "C")
        assert f.info.page_axes == "Z"
        for z in range(4):
            np.testing.assert_array_equal(f.page(z), np.moveaxis(a[z], 0, -1))


def test_ome_tiff_time_channels(tmp_path):
    a = _stack((3, 3, 16, 16))
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, a, ome=True, metadata={"axes": "TCYX"})
    with open_image(path) as f:
        assert f.info.n_pages == 3 and f.info.n_channels == 3
        np.testing.assert_array_equal(f.page(2), np.moveaxis(a[2], 0, -1))


def test_plain_multipage_rgb_and_single(tmp_path):
    tifffile.imwrite(tmp_path / "pages.tif", _stack((5, 10, 12)))
    tifffile.imwrite(tmp_path / "rgb.tif", _stack((10, 12, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "f32.tif", _stack((10, 12)).astype(np.float32))
    with open_image(tmp_path / "pages.tif") as f:
        assert (len(f), f.page(4).shape) == (5, (10, 12, 1))
    with open_image(tmp_path / "rgb.tif") as f:
        assert (len(f), f.page(0).shape, f.info.channel_axis) == (1, (10, 12, 3), "S")
    with open_image(tmp_path / "f32.tif") as f:
        assert f.page(0).dtype == np.float32


def test_png_and_jpeg(tmp_path):
    gray = (np.arange(200).reshape(10, 20) % 255).astype(np.uint8)
    iio.imwrite(tmp_path / "g.png", gray)
    iio.imwrite(tmp_path / "c.jpg", np.stack([gray] * 3, -1))
    with open_image(tmp_path / "g.png") as f:
        np.testing.assert_array_equal(f.page(0)[..., 0], gray)
    with open_image(tmp_path / "c.jpg") as f:
        assert f.page(0).shape == (10, 20, 3)


def test_stack_pages_are_read_lazily(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, _stack((200, 32, 32)))
    calls = []
    original = tifffile.TiffPage.asarray

    def counting(self, *a, **k):
        calls.append(self.index)
        return original(self, *a, **k)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting)
    with open_image(path) as f:
        assert len(f) == 200 and calls == []  # opening reads no pixels
        f.page(150)
    assert calls == [150]


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="broken.tif"):
        open_image(bad)
    with pytest.raises(ImageReadError, match="nope.png"):
        open_image(tmp_path / "nope.png")


def test_percentile_normalisation_ignores_the_container_depth():
    rng = np.random.default_rng(1)
    pattern = rng.random((64, 64))
    twelve_bit = (pattern * 4095).astype(np.uint16)  # 12-bit data in a 16-bit container
    eight_bit = (pattern * 255).astype(np.uint8)
    a = normalize_percentile(twelve_bit[..., None])
    b = normalize_percentile(eight_bit[..., None])
    assert a.dtype == np.float32 and a.min() == 0 and a.max() == 255
    assert np.abs(a - b).mean() < 2.0
    # per channel: a dim channel is stretched like a bright one
    two = np.stack([twelve_bit, twelve_bit // 16], -1)
    n = normalize_percentile(two)
    assert np.abs(n[..., 0] - n[..., 1]).mean() < 2.0
    assert (normalize_percentile(np.full((8, 8, 1), 7)) == 0).all()  # no contrast -> 0


def test_channel_mapping():
    page = np.stack([np.full((4, 4), v) for v in (1, 2, 3, 4)], -1)
    np.testing.assert_array_equal(select_channels(page[..., :1])[0, 0], [1, 1, 1])
    np.testing.assert_array_equal(select_channels(page[..., :2])[0, 0], [1, 2, 0])
    np.testing.assert_array_equal(select_channels(page)[0, 0], [1, 2, 3])
    np.testing.assert_array_equal(select_channels(page, (3, None, 0))[0, 0], [4, 0, 1])
    assert parse_channel_map("3,-,0") == (3, None, 0) and parse_channel_map("auto") is None
    with pytest.raises(ImageReadError, match="channel 5"):
        select_channels(page, (5, 0, 0))


def test_resize_pads_instead_of_cropping():
    page = np.zeros((20, 80), np.uint16)
    page[:, :4] = 1000  # bright left edge
    page[:, -4:] = 1000  # bright right edge
    out = preprocess(page, PreprocessSpec(image_size=40))
    assert out.shape == (40, 40, 3) and out.dtype == np.float32
    assert out[:, 0].max() > 100 and out[:, -1].max() > 100  # both edges survive
    assert out[0].max() == 0 and out[-1].max() == 0  # padding above and below
    stretched = preprocess(page, PreprocessSpec(image_size=40, resize_mode="stretch"))
    assert stretched[0, 0, 0] > 100


def test_preprocess_rejects_wrong_shapes():
    with pytest.raises(ImageReadError, match="shape"):
        preprocess(np.zeros((2, 3, 4, 5)), PreprocessSpec(image_size=16))
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessSpec(resize_mode="crop")


def test_a_sparse_image_is_not_blanked():
    """A few bright pixels on an empty background: the percentiles coincide (both 0), so
    normalisation falls back to min-max instead of returning an all-black image."""
    page = np.zeros((100, 100), np.uint16)
    page[40:42, 50:52] = 3000  # 4 of 10,000 pixels: below the 99.8th percentile
    out = normalize_percentile(page[..., None])
    assert out.max() == 255 and out[40, 50, 0] == 255 and out[0, 0, 0] == 0
    model_input = preprocess(page, PreprocessSpec(image_size=50))
    assert model_input.max() > 100  # the object survives into the model's input


def test_fixed_intensity_keeps_absolute_brightness():
    pattern = np.random.default_rng(2).random((32, 32))
    dim = (pattern * 1000).astype(np.uint16)
    bright = (pattern * 4000).astype(np.uint16)
    # percentile normalisation makes them alike; fixed keeps them apart
    pct = PreprocessSpec(image_size=32)
    assert np.abs(preprocess(dim, pct) - preprocess(bright, pct)).mean() < 2
    fixed = PreprocessSpec(image_size=32, intensity="fixed", intensity_range=(0, 4095))
    a, b = preprocess(dim, fixed), preprocess(bright, fixed)
    assert b.mean() == pytest.approx(4 * a.mean(), rel=0.02)
    assert b.max() <= 255 and a.max() == pytest.approx(1000 * 255 / 4095, abs=2)
    # without a range: the dtype's (8-bit 0-255 stays as it is)
    eight = (pattern * 200).astype(np.uint8)
    out = preprocess(eight, PreprocessSpec(image_size=32, intensity="fixed"))
    np.testing.assert_allclose(out[..., 0], eight, atol=1e-4)
    # a bool mask is read as 0/1 in both modes, not refused by numpy
    mask = pattern > 0.5
    assert preprocess(mask, PreprocessSpec(image_size=32)).max() == 255
    assert preprocess(mask, PreprocessSpec(image_size=32, intensity="fixed")).max() == 255


def test_intensity_settings_parse_and_travel_with_the_spec():
    from napari_microclf.core.images import parse_intensity

    assert parse_intensity("fixed:0,4095") == ("fixed", (0.0, 4095.0))
    assert parse_intensity("percentile") == ("percentile", None)
    with pytest.raises(ValueError, match="MIN,MAX"):
        parse_intensity("fixed:abc")
    with pytest.raises(ValueError, match="MIN < MAX"):
        PreprocessSpec(intensity="fixed", intensity_range=(5, 5))
    spec = PreprocessSpec(64, intensity="fixed", intensity_range=(0, 4095))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    # a bundle saved before these settings existed reads as percentile
    assert PreprocessSpec.from_dict({"image_size": 64}).intensity == "percentile"


def test_the_header_alone_gives_what_reading_gives(tmp_path):
    """read_header (the preflight's and count_pages' fast pass) agrees with open_image on
    every layout: ImageJ hyperstacks, OME, RGB, multi-page, PNG gray/RGBA/16-bit, JPEG, BMP,
    an animated PNG, and a palette PNG."""
    from PIL import Image

    files = {
        "hyper.tif": lambda p: tifffile.imwrite(
            p, _stack((3, 2, 20, 30)), imagej=True, metadata={"axes": "ZCYX"}
        ),
        "ome.ome.tif": lambda p: tifffile.imwrite(
            p, _stack((2, 3, 20, 30)), ome=True, metadata={"axes": "TCYX"}
        ),
        "rgb.tif": lambda p: tifffile.imwrite(p, _stack((20, 30, 3), np.uint8), photometric="rgb"),
        "pages.tif": lambda p: tifffile.imwrite(p, _stack((5, 20, 30)), photometric="minisblack"),
        "gray16.png": lambda p: iio.imwrite(p, _stack((20, 30))),
        "rgba.png": lambda p: iio.imwrite(p, _stack((20, 30, 4), np.uint8)),
        "photo.jpg": lambda p: iio.imwrite(p, _stack((20, 30, 3), np.uint8)),
        "gray.bmp": lambda p: iio.imwrite(p, _stack((20, 30), np.uint8)),
        "palette.png": lambda p: Image.fromarray(_stack((20, 30), np.uint8)).convert("P").save(p),
        "anim.png": lambda p: Image.fromarray(_stack((20, 30), np.uint8)).save(
            p, save_all=True, append_images=[Image.fromarray(_stack((20, 30), np.uint8))]
        ),
    }
    for name, write in files.items():
        write(tmp_path / name)
        with open_image(tmp_path / name) as f:
            full = f.info
        header, notes = read_header(tmp_path / name)
        assert header == full and notes == [], name


def test_shape_problem_states_the_minimum_sides():
    assert shape_problem((2, 20000)) is None and shape_problem((8, 8, 3)) is None
    assert shape_problem((1, 20000)) == (
        "too small: 1 x 20000 pixels (height x width); each "
        "side needs at least 2 pixels and the longer one at "
        "least 8"
    )
    assert shape_problem((7, 7)).startswith("too small: 7 x 7 pixels")
    with pytest.raises(ImageReadError, match="too small: 1 x 1 pixels"):
        preprocess(np.zeros((1, 1), np.uint8), PreprocessSpec(32))


def test_imagej_hyperstack_with_one_page_entry_is_memory_mapped_not_read_whole(tmp_path):
    """ImageJ writes files over 4 GiB with one page table entry (the page count only in its
    description): prediction maps them, so a page costs a page, not the whole file."""
    from napari_microclf.core.images import ImageFile

    d = np.arange(7 * 2 * 16 * 20, dtype=np.uint16).reshape(7, 2, 16, 20)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, d, imagej=True, truncate=True, metadata={"axes": "ZCYX"})
    f = ImageFile(path)
    assert isinstance(f._array, np.memmap) and len(f) == 7
    np.testing.assert_array_equal(f.page(4), np.moveaxis(d[4], 0, -1))
