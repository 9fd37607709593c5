"""What the reader takes from a file's header besides pixels: the physical pixel size (the
layers' scale and units), the channel names, and the lazy threshold; and the channel groups
of layers another reader opened."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from napari.components import ViewerModel
from napari.layers import Image
from napari.layers._source import layer_source

from napari_microclf import _reader
from napari_microclf._qt import _layers
from napari_microclf._reader import napari_get_reader
from napari_microclf.core.images import open_image, read_header

PLUGIN = "napari-microclf"


def _stack(shape, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def _read(path):
    return napari_get_reader(str(path))(str(path))


def _ome(path, data=None, **meta):
    data = _stack((3, 2, 16, 18)) if data is None else data  # Z, C, Y, X
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "ZCYX",
            "PhysicalSizeX": 0.65,
            "PhysicalSizeY": 0.65,
            "PhysicalSizeZ": 2.0,
            "Channel": {"Name": ["DAPI", "GFP"]},
            **meta,
        },
    )
    return data


# -- pixel size and channel names ------------------------------------------------------------


def test_ome_pixel_size_and_channel_names(tmp_path):
    path = tmp_path / "cells.ome.tif"
    data = _ome(path)
    ((array, kwargs, _),) = _read(path)
    assert array.shape == (3, 16, 18, 2)
    assert kwargs["name"] == ["cells [DAPI]", "cells [GFP]"]
    assert kwargs["scale"] == [pytest.approx((2.0, 0.65, 0.65))] * 2  # Z is a layer axis
    assert kwargs["units"] == [("µm", "µm", "µm")] * 2
    meta = [m["microclf"] for m in kwargs["metadata"]]
    assert [m["channel_name"] for m in meta] == ["DAPI", "GFP"]
    assert meta[0]["pixel_size"] == pytest.approx({"Z": 2.0, "Y": 0.65, "X": 0.65})
    assert meta[0]["unit"] == "µm" and meta[0]["channel_names"] == ["DAPI", "GFP"]
    np.testing.assert_array_equal(np.asarray(array)[2, ..., 1], data[2, 1])

    # units are converted to µm; a time axis keeps 1; an unnamed channel keeps C<i>
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        path,
        _stack((4, 2, 16, 18)),
        ome=True,
        metadata={
            "axes": "TCYX",
            "PhysicalSizeX": 650,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 650,
            "PhysicalSizeYUnit": "nm",
            "Channel": {"Name": ["DAPI", ""]},
        },
    )
    ((_, kwargs, _),) = _read(path)
    assert kwargs["scale"][0] == pytest.approx((1.0, 0.65, 0.65))
    assert kwargs["units"][0] == ("pixel", "µm", "µm")
    assert kwargs["name"] == ["nm [DAPI]", "nm [C1]"]


def test_imagej_resolution_unit_spacing_and_labels(tmp_path):
    d = _stack((3, 2, 16, 18))  # Z, C, Y, X
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        d,
        imagej=True,
        resolution=(1 / 0.65, 1 / 0.65),
        metadata={"axes": "ZCYX", "unit": "micron", "spacing": 2.5, "Labels": ["DAPI", "GFP"] * 3},
    )
    ((array, kwargs, _),) = _read(path)
    assert kwargs["scale"] == [pytest.approx((2.5, 0.65, 0.65))] * 2
    assert kwargs["name"] == ["ij [DAPI]", "ij [GFP]"]
    np.testing.assert_array_equal(np.asarray(array)[1, ..., 0], d[1, 0])

    # ImageJ's escaped micro sign; per-slice labels are not channel names
    path = tmp_path / "slices.tif"
    tifffile.imwrite(
        path,
        d,
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"axes": "ZCYX", "unit": "\\u00B5m", "Labels": [f"z{i}" for i in range(6)]},
    )
    ((_, kwargs, _),) = _read(path)
    assert kwargs["scale"][0] == pytest.approx((1.0, 0.5, 0.5))  # no spacing: Z stays 1
    assert kwargs["name"] == ["slices [C0]", "slices [C1]"]

    # an uncalibrated ImageJ file (no unit), a plain TIFF: no scale, as before
    for name, kw in [
        ("plain_ij.tif", {"imagej": True, "metadata": {"axes": "ZYX"}}),
        ("plain.tif", {"photometric": "minisblack"}),
    ]:
        tifffile.imwrite(tmp_path / name, d[:, 0], **kw)
        ((_, kwargs, _),) = _read(tmp_path / name)
        assert "scale" not in kwargs and "units" not in kwargs, name
        assert "pixel_size" not in kwargs["metadata"]["microclf"]


def test_resolution_tags_in_cm_count_dpi_does_not(tmp_path):
    img = _stack((16, 18))
    tifffile.imwrite(
        tmp_path / "cm.tif", img, resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER"
    )
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(300, 300), resolutionunit="INCH")
    ((_, kwargs, _),) = _read(tmp_path / "cm.tif")
    assert kwargs["scale"] == pytest.approx((0.25, 0.5)) and kwargs["units"] == ("µm", "µm")
    ((_, kwargs, _),) = _read(tmp_path / "dpi.tif")
    assert "scale" not in kwargs
    assert read_header(tmp_path / "dpi.tif")[0].pixel_size == (None, None, None)


def test_damaged_calibration_is_left_out_not_refused(tmp_path):
    path = tmp_path / "odd.ome.tif"
    tifffile.imwrite(
        path,
        _stack((2, 16, 18)),
        ome=True,
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "pixel"},
    )  # not a length
    ((_, kwargs, _),) = _read(path)
    assert "scale" not in kwargs and kwargs["name"] == ["odd [C0]", "odd [C1]"]


def test_the_header_gives_the_calibration_without_pixel_data(tmp_path, monkeypatch):
    path = tmp_path / "cells.ome.tif"
    _ome(path)
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij,
        _stack((3, 2, 16, 18)),
        imagej=True,
        truncate=True,
        resolution=(2.0, 2.0),
        metadata={"axes": "ZCYX", "unit": "nm"},
    )
    for p in (path, ij):  # reading for prediction says what the header says
        with open_image(p) as f:
            assert f.info == read_header(p)[0], p.name
    assert read_header(ij)[0].pixel_size == (None, pytest.approx(5e-4), pytest.approx(5e-4))

    def no(*args, **kwargs):
        raise AssertionError("pixel data read")

    for cls, method in [
        (tifffile.TiffPage, "asarray"),
        (tifffile.FileHandle, "read_array"),
        (tifffile.FileHandle, "read_segments"),
    ]:
        monkeypatch.setattr(cls, method, no)
    info, notes = read_header(path)
    assert info.pixel_size == pytest.approx((2.0, 0.65, 0.65)) and notes == []
    assert info.channel_names == ("DAPI", "GFP")


def test_viewer_open_gives_layers_their_scale(make_napari_viewer, tmp_path):
    path = tmp_path / "cells.ome.tif"
    _ome(path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert [lyr.name for lyr in layers] == ["cells [DAPI]", "cells [GFP]"]
    for lyr in layers:
        np.testing.assert_allclose(lyr.scale, (2.0, 0.65, 0.65))
        assert [str(u) for u in lyr.units] == ["micrometer"] * 3
    assert _layers.channel_group(viewer, layers[1]) == list(layers)
    # the sliders walk Z in µm: the page in view is found through the scale
    _layers.show_page(viewer, layers[0], 2)
    assert _layers.page_in_view(viewer, layers[0]) == (2,)


# -- lazy threshold ------------------------------------------------------------------------


def test_lazy_threshold_follows_available_memory(tmp_path, monkeypatch):
    data = _stack((40, 32, 32))  # 81,920 bytes of pixels
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    monkeypatch.setattr(_reader, "LAZY_BYTES", None)
    available = {"bytes": 8 * 1_000_000}
    monkeypatch.setattr(_reader, "available_memory", lambda: available["bytes"])

    assert _reader.lazy_threshold() == 1_000_000  # an eighth
    ((array, kwargs, _),) = _read(path)
    assert not kwargs["metadata"]["microclf"]["lazy"] and isinstance(array, np.ndarray)

    available["bytes"] = 8 * 50_000  # less memory: the same file opens lazily
    assert _reader.lazy_threshold() == 50_000
    ((array, kwargs, _),) = _read(path)
    assert kwargs["metadata"]["microclf"]["lazy"]
    np.testing.assert_array_equal(np.asarray(array[7]), data[7])

    available["bytes"] = 2**40  # plenty: capped at 1 GiB
    assert _reader.lazy_threshold() == _reader.LAZY_MAX_BYTES == 2**30
    available["bytes"] = None  # unknown: the old fixed 256 MiB
    assert _reader.lazy_threshold() == 256 * 2**20
    monkeypatch.setattr(_reader, "LAZY_BYTES", 1234)  # a fixed threshold wins
    assert _reader.lazy_threshold() == 1234


def test_available_memory_is_known_here():
    available = _reader.available_memory()
    assert available is None or available > 0


# -- channel groups of another reader's layers ---------------------------------------------


def test_another_readers_channel_layers_group_by_opening(make_napari_viewer, tmp_path):
    data = _stack((2, 16, 18))  # C, Y, X
    path, other = tmp_path / "two.tif", tmp_path / "other.tif"
    tifffile.imwrite(path, data)
    tifffile.imwrite(other, data)
    viewer = make_napari_viewer()
    # napari's own reader; channel_axis splits the file into channel layers
    first = viewer.open(str(path), plugin="napari", channel_axis=0)
    second = viewer.open(str(path), plugin="napari", channel_axis=0)
    third = viewer.open(str(other), plugin="napari", channel_axis=0)
    assert len(first) == len(second) == len(third) == 2
    assert first[0].source.path == second[0].source.path and not first[0].metadata
    for opening in (first, second, third):
        for lyr in opening:
            assert _layers.channel_group(viewer, lyr) == list(opening)
    source = _layers.page_source(viewer, second[1])
    page = source.page(0)
    assert page.shape == (16, 18, 2)
    np.testing.assert_array_equal(page, np.moveaxis(data, 0, -1))

    # a layer moved away from its opening is used alone, and its opening goes on without it
    viewer.layers.move(viewer.layers.index(first[1]), len(viewer.layers))
    assert _layers.channel_group(viewer, first[1]) == [first[1]]
    assert _layers.channel_group(viewer, first[0]) == [first[0]]
    assert _layers.channel_group(viewer, second[0]) == list(second)


def test_all_additive_layers_of_another_reader_split_by_repeated_names(tmp_path):
    viewer = ViewerModel()
    path = str(tmp_path / "x.czi")
    plane = np.zeros((2, 12, 14), np.uint8)
    made = []
    for _opening in range(2):
        for c in ("DAPI", "GFP"):
            with layer_source(path=path, reader_plugin="some-reader"):
                made.append(viewer.add_layer(Image(plane, name=c, blending="additive")))
    with layer_source(path=path, reader_plugin="some-reader"):
        other_shape = viewer.add_layer(Image(plane[:, :6], name="small", blending="additive"))
    assert [lyr.name for lyr in made] == ["DAPI", "GFP", "DAPI [1]", "GFP [1]"]
    assert _layers.channel_group(viewer, made[1]) == made[:2]
    assert _layers.channel_group(viewer, made[2]) == made[2:]
    assert _layers.channel_group(viewer, other_shape) == [other_shape]
    # layers added in code (no source path), and RGB layers, stay alone
    plain = viewer.add_image(plane)
    rgb = viewer.add_image(np.zeros((12, 14, 3), np.uint8), rgb=True)
    assert _layers.channel_group(viewer, plain) == [plain]
    assert _layers.channel_group(viewer, rgb) == [rgb]
