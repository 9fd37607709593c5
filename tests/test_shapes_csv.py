"""Extreme page shapes in bounded time and memory; CSV cells that cannot run as formulas."""

import csv
import time
import tracemalloc

import numpy as np
import pytest
from skimage.transform import resize

from napari_microclf.core.csv_format import csv_cell, write_csv
from napari_microclf.core.images import (
    PreprocessSpec,
    aspect_warning,
    preprocess,
    resize_plane,
)
from napari_microclf.core.results import PagePrediction


def _pad_then_resize(plane, size):
    """resize_plane before issue 8: pad to a square of the long side, then resize."""
    h, w = plane.shape
    if h != w:
        side = max(h, w)
        padded = np.zeros((side, side), dtype=plane.dtype)
        y0, x0 = (side - h) // 2, (side - w) // 2
        padded[y0 : y0 + h, x0 : x0 + w] = plane
        plane = padded
    if plane.shape == (size, size):
        return plane.astype(np.float32, copy=False)
    out = resize(
        plane,
        (size, size),
        order=1,
        anti_aliasing=plane.shape[0] >= 1.5 * size,
        preserve_range=True,
    )
    return out.astype(np.float32, copy=False)


def _smooth(shape):
    """Waves of about 1/4 of the image (60-75 pixels at 224): differences show as sub-pixel."""
    y, x = np.mgrid[: shape[0], : shape[1]] / max(shape) * 224
    return (255 * (0.5 + 0.5 * np.sin(x / 10) * np.cos(y / 12))).astype(np.float32)


@pytest.mark.parametrize("side", [64, 200, 224, 300, 336, 500])
def test_square_pages_resize_exactly_as_before(side):
    rng = np.random.default_rng(side)
    for plane in (rng.uniform(0, 255, (side, side)).astype(np.float32), _smooth((side, side))):
        np.testing.assert_array_equal(resize_plane(plane, 224), _pad_then_resize(plane, 224))


@pytest.mark.parametrize("shape", [(301, 300), (300, 301), (225, 224), (640, 600), (990, 1000)])
def test_near_square_pages_resize_almost_as_before(shape):
    plane = _smooth(shape)
    new, old = resize_plane(plane, 224), _pad_then_resize(plane, 224)
    diff = np.abs(new - old)
    assert new.shape == (224, 224) and new.dtype == np.float32
    # of 255: the scale of the short side is rounded to whole pixels, and the seam pixel between
    # image and padding differs (padding first blurred some image into it)
    assert diff.mean() < 1 and np.percentile(diff, 95) < 3


def test_padding_is_black_and_centred_and_edges_survive():
    page = np.zeros((30, 300), np.float32)
    page[:, :8] = page[:, -8:] = 255  # bright left and right edges, 1 pixel at 40
    out = resize_plane(page, 40)
    rows = np.flatnonzero(out.max(axis=1) > 0)
    assert len(rows) == 4 and rows[0] == 18 and rows[-1] == 21  # 30 * 40 / 300 rows, centred
    assert out[:18].max() == 0 and out[22:].max() == 0  # padding exactly black
    assert out[rows, 0].min() > 100 and out[rows, -1].min() > 100


def test_a_line_scan_costs_what_a_small_image_costs():
    """2 x 20000 took 5 minutes and 1.6 GB padded to 20000 x 20000; now milliseconds."""
    page = np.random.default_rng(0).integers(0, 4096, (2, 20000)).astype(np.uint16)
    page[:, 9000:11000] = 4095
    spec = PreprocessSpec()
    preprocess(page[:, :300], spec)  # imports
    tracemalloc.start()
    t = time.perf_counter()
    try:
        out = preprocess(page, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t
    assert seconds < 2 and peak < 20 * 2**20, (seconds, peak)
    assert out.shape == (224, 224, 3)
    lit = np.flatnonzero(out[..., 0].max(axis=1) > 0)
    assert list(lit) == [111]  # one row, in the middle; the rest black
    assert out[111, 102:122, 0].min() > 200  # the bright segment survives
    tall = preprocess(page.T, spec)  # the same, standing
    np.testing.assert_allclose(tall[..., 0], out[..., 0].T, atol=1e-3)


def test_aspect_warning():
    msg = aspect_warning((2, 20000), "scan.tif")
    assert msg.startswith("scan.tif: 2 x 20000 pixels") and "10000:1" in msg
    assert "crop or tile" in msg
    assert "41:1" in aspect_warning((41, 1, 3), "a.png")
    assert "20.5:1" in aspect_warning((10, 205), "b.png")
    assert aspect_warning((10, 200), "c.tif") is None  # 20:1 is still fine
    assert aspect_warning((512, 512, 2), "d.tif") is None
    assert aspect_warning((0, 5), "e.tif") is None


# -- CSV ---------------------------------------------------------------------------------------


def test_cells_that_look_like_formulas_become_text():
    for text in ('=HYPERLINK("x")', "+cmd.tif", "-2+3", "@SUM(A1)", "\tx", "\rx", "-", "=1"):
        assert csv_cell(text) == "'" + text
    for text in ("-0.5", "+3", "-1e-3", ".5", "0.1234", "12", "a=b", "/data/x.tif", "", "'x"):
        assert csv_cell(text) == text
    assert csv_cell(-0.25) == "-0.25" and csv_cell(3) == "3"


def test_write_csv_escapes_and_round_trips(tmp_path):
    names = ['=HYPERLINK("x")', "zellkern-größe", "-1"]

    def probs(*p):
        return dict(zip(names, p, strict=True))

    preds = [
        PagePrediction("+cmd.tif", 0, names[0], 0.9, probs(0.9, 0.06, 0.04)),
        PagePrediction("/data/Über.tif", 2, names[1], 0.5, probs(0.2, 0.5, 0.3)),
        PagePrediction(None, 1, "-1", 0.7, probs(0.1, 0.2, 0.7)),
    ]
    path = tmp_path / "out.csv"
    assert write_csv(preds, path, names, threshold=0.6) == 3
    raw = path.read_bytes()
    assert "zellkern-größe".encode() in raw and b"\r\n" in raw and b"\r\r\n" not in raw
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "file",
        "page",
        "class",
        "confidence",
        'p_=HYPERLINK("x")',  # a probability column starts with p_: never a formula
        "p_zellkern-größe",
        "p_-1",
    ]
    assert rows[1] == [
        "'+cmd.tif",
        "0",
        '\'=HYPERLINK("x")',
        "0.9000",
        "0.9000",
        "0.0600",
        "0.0400",
    ]
    assert rows[2] == ["/data/Über.tif", "2", "uncertain", "0.5000", "0.2000", "0.5000", "0.3000"]
    assert rows[3] == ["", "1", "-1", "0.7000", "0.1000", "0.2000", "0.7000"]  # a number
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file is gone
