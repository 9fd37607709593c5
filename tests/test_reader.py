"""The TIFF reader through napari: multi-page, OME, multichannel, RGB, lazy; None otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_microclf import _reader
from napari_microclf._reader import napari_get_reader


def _stack(shape, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def test_multipage_stack_through_napari(make_napari_viewer, tmp_path):
    data = _stack((5, 24, 20))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-microclf")
    assert len(layers) == 1
    np.testing.assert_array_equal(np.asarray(layers[0].data), data)
    assert layers[0].metadata["microclf"]["n_pages"] == 5


def test_ome_multichannel_becomes_channel_layers(tmp_path):
    data = _stack((3, 2, 16, 18))  # T, C, Y, X
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCYX"})
    layers = napari_get_reader(str(path))(str(path))
    (array, kwargs, kind), = layers
    assert kind == "image" and kwargs["channel_axis"] == array.ndim - 1
    assert kwargs["name"] == ["cells [C0]", "cells [C1]"]
    assert array.shape == (3, 16, 18, 2)
    np.testing.assert_array_equal(np.asarray(array)[1, ..., 1], data[1, 1])
    assert [m["microclf"]["channel"] for m in kwargs["metadata"]] == [0, 1]


def test_rgb_is_rgb(tmp_path):
    data = _stack((12, 10, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    (array, kwargs, _), = napari_get_reader(str(path))(str(path))
    assert kwargs["rgb"] is True
    np.testing.assert_array_equal(array, data)


def test_big_stack_is_lazy_and_reads_pages_on_demand(tmp_path, monkeypatch):
    data = _stack((40, 32, 32))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    monkeypatch.setattr(_reader, "LAZY_BYTES", 1000)
    (array, kwargs, _), = napari_get_reader(str(path))(str(path))
    import dask.array as da

    assert isinstance(array, da.Array) and kwargs["metadata"]["microclf"]["lazy"]
    assert array.chunksize[0] == 1  # one page per chunk
    np.testing.assert_array_equal(array[17].compute(), data[17])


@pytest.mark.parametrize("name,content", [("notes.txt", b"hello"), ("broken.tif", b"II*\x00junk"),
                                          ("empty.tiff", b"")])
def test_returns_none_for_what_it_cannot_read(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert napari_get_reader(str(path)) is None
    assert _reader.read_tiff(str(path)) is None
