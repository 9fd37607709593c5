"""The TIFF reader through napari: multi-page, OME, multichannel, RGB, lazy; None otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
    ((array, kwargs, kind),) = layers
    assert kind == "image" and kwargs["channel_axis"] == array.ndim - 1
    assert kwargs["name"] == ["cells [C0]", "cells [C1]"]
    assert array.shape == (3, 16, 18, 2)
    np.testing.assert_array_equal(np.asarray(array)[1, ..., 1], data[1, 1])
    assert [m["microclf"]["channel"] for m in kwargs["metadata"]] == [0, 1]
    # one opening: one open_id for its channel layers; the next opening gets another
    ids = {m["microclf"]["open_id"] for m in kwargs["metadata"]}
    ((_, again, _),) = napari_get_reader(str(path))(str(path))
    assert len(ids) == 1 and ids.isdisjoint(m["microclf"]["open_id"] for m in again["metadata"])


def test_rgb_is_rgb(tmp_path):
    data = _stack((12, 10, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    ((array, kwargs, _),) = napari_get_reader(str(path))(str(path))
    assert kwargs["rgb"] is True
    np.testing.assert_array_equal(array, data)


def test_big_stack_is_lazy_and_reads_pages_on_demand(tmp_path, monkeypatch):
    data = _stack((40, 32, 32))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    monkeypatch.setattr(_reader, "LAZY_BYTES", 1000)
    ((array, kwargs, _),) = napari_get_reader(str(path))(str(path))
    import dask.array as da

    assert isinstance(array, da.Array) and kwargs["metadata"]["microclf"]["lazy"]
    assert array.chunksize[0] == 1  # one page per chunk
    np.testing.assert_array_equal(array[17].compute(), data[17])


def test_big_compressed_stack_is_lazy_page_by_page(tmp_path, monkeypatch):
    data = _stack((12, 32, 32))
    path = tmp_path / "zip.tif"
    tifffile.imwrite(path, data, compression="zlib", metadata={"axes": "ZYX"})
    assert _reader.mapping(path) is None  # not memory-mappable
    monkeypatch.setattr(_reader, "LAZY_BYTES", 1000)
    ((array, kwargs, _),) = napari_get_reader(str(path))(str(path))
    assert kwargs["metadata"]["microclf"]["lazy"] and array.chunksize[0] == 1
    np.testing.assert_array_equal(array[5].compute(), data[5])


def _files(tmp_path) -> dict:
    d = _stack((6, 2, 16, 20))
    files = {
        "imagej": d,
        "imagej_truncated": d,
        "plain": d[:, 0],
        "ome": d,
        "rgb": None,
        "zlib": d[:, 1],
    }
    tifffile.imwrite(tmp_path / "imagej.tif", d, imagej=True, metadata={"axes": "ZCYX"})
    # the layout ImageJ writes above 4 GiB: one IFD, the page count in the description
    tifffile.imwrite(
        tmp_path / "imagej_truncated.tif", d, imagej=True, truncate=True, metadata={"axes": "ZCYX"}
    )
    tifffile.imwrite(tmp_path / "plain.tif", d[:, 0], metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "ome.tif", d, ome=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "rgb.tif", _stack((3, 8, 9, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "zlib.tif", d[:, 1], compression="zlib")
    return {name: tmp_path / f"{name}.tif" for name in files}


def test_claiming_a_file_reads_its_header_only(tmp_path, monkeypatch):
    files = _files(tmp_path)
    reads = []

    def spy(name):
        def read(*args, **kwargs):
            reads.append(name)
            raise AssertionError(f"{name} read pixel data")

        return read

    for cls, method in [
        (tifffile.TiffPage, "asarray"),
        (tifffile.TiffFrame, "asarray"),
        (tifffile.TiffPageSeries, "asarray"),
        (tifffile.FileHandle, "read_array"),
        (tifffile.FileHandle, "read_segments"),
    ]:
        monkeypatch.setattr(cls, method, spy(f"{cls.__name__}.{method}"))
    for path in files.values():
        assert napari_get_reader(str(path)) is _reader.read_tiff, path.name
    assert reads == []


def test_truncated_imagej_hyperstack_is_memory_mapped(tmp_path, monkeypatch):
    d = _stack((7, 2, 16, 20))
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, d, imagej=True, truncate=True, metadata={"axes": "ZCYX"})
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1 and tif.series[0].is_truncated
    monkeypatch.setattr(_reader, "LAZY_BYTES", 1000)
    ((array, kwargs, _),) = napari_get_reader(str(path))(str(path))
    assert array.shape == (7, 16, 20, 2) and array.chunksize == (1, 16, 20, 2)
    np.testing.assert_array_equal(np.asarray(array[4, ..., 1]), d[4, 1])
    np.testing.assert_array_equal(np.asarray(array), np.moveaxis(d, 1, -1))


_BIG_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from napari.components import ViewerModel
    from napari_microclf._reader import napari_get_reader

    def peak():
        try:  # Linux: VmHWM, which clear_refs below can restart
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("VmHWM:"))
        except OSError:  # ru_maxrss: bytes on macOS, KiB elsewhere
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    path = sys.argv[1]
    try:  # Linux: start the peak afresh from here (else it is the imports' peak)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base, t0 = peak(), time.perf_counter()
    reader = napari_get_reader(path)
    (data, kwargs, _), = reader(path)
    t_read = time.perf_counter() - t0
    layers = ViewerModel().add_image(data, **kwargs)  # as napari adds a reader's layers
    t_open = time.perf_counter() - t0
    plane = np.asarray(layers[1].data[257])
    t_plane = time.perf_counter() - t0
    print(json.dumps({"lazy": kwargs["metadata"][0]["microclf"]["lazy"],
                      "shape": list(data.shape), "layers": len(layers),
                      "t_read": t_read, "t_open": t_open, "t_plane": t_plane,
                      "growth": peak() - base, "corner": plane[:3, :4].tolist(),
                      "sum": int(plane.sum(dtype=np.int64))}))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_imagej_hyperstack_over_4gib_opens_lazily(tmp_path):
    """A real 4.7 GiB ImageJ file (sparse on disk), through the reader and napari."""
    path = tmp_path / "huge.tif"
    shape = (300, 2, 2048, 2048)  # Z, C, Y, X uint16: 4.7 GiB
    try:
        # data=None: tifffile seeks over the pixels, so the file is sparse where supported
        tifffile.imwrite(
            path,
            shape=shape,
            dtype=np.uint16,
            imagej=True,
            truncate=True,
            metadata={"axes": "ZCYX"},
        )
        if os.stat(path).st_blocks * 512 > 64 * 2**20:
            pytest.skip("this file system has no sparse files")
        mm = tifffile.memmap(path)
        mm[257, 1, :3, :4] = np.arange(12).reshape(3, 4) + 100
        mm.flush()
        del mm
        with tifffile.TiffFile(path) as tif:  # ImageJ's own layout above 4 GiB
            assert len(tif.pages) == 1 and tif.series[0].is_truncated
        size = os.stat(path).st_size
        assert size > 4 * 2**30
        out = subprocess.run(
            [sys.executable, "-c", _BIG_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"4.7 GiB ImageJ: read {r['t_read']:.2f} s, napari open {r['t_open']:.2f} s, "
            f"one plane {r['t_plane']:.2f} s, peak memory growth {r['growth'] / 2**20:.0f} "
            f"MiB"
        )
        assert r["lazy"] and r["shape"] == [300, 2048, 2048, 2] and r["layers"] == 2
        assert r["corner"] == (np.arange(12).reshape(3, 4) + 100).tolist()
        assert r["sum"] == sum(range(100, 112))
        assert r["growth"] < 512 * 2**20 < size / 8
        assert r["t_plane"] < 60
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "name,content", [("notes.txt", b"hello"), ("broken.tif", b"II*\x00junk"), ("empty.tiff", b"")]
)
def test_returns_none_for_what_it_cannot_read(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert napari_get_reader(str(path)) is None
    assert _reader.read_tiff(str(path)) is None
