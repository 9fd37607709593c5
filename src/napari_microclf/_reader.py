"""napari reader for TIFF images and stacks (multi-page, ImageJ, OME; multichannel).

Claiming a file reads its header only (the IFDs and the ImageJ/OME description, never pixel
data), so napari asks this reader about a 50 GB stack as fast as about a 5 kB one.

A file above ``LAZY_BYTES`` is opened lazily, as a dask array with one page per chunk, so it
opens after reading its header and each slider move reads one page:

- pixels stored contiguously and uncompressed (ImageJ hyperstacks, including ImageJ files
  over 4 GiB, which hold one IFD and a page count in their description only) are
  memory-mapped;
- other files (compressed, tiled, scattered pages) are read page by page through
  :func:`napari_microclf.core.images.open_image`.

Smaller files are read into memory. Channels (``C`` planes, or ``S`` samples that are not
RGB) become one layer per channel through ``channel_axis``; every layer carries
``metadata["microclf"]`` with the source path, the channel, the page axes and an ``open_id``
shared by the channel layers of one opening only, which is how the Annotate and Predict
widgets put the channels of one image back together (and keep two openings of one file
apart).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np

from .core.images import TIFF_SUFFIXES, ImageReadError, open_image, read_header

LAZY_BYTES = 256 * 2**20  # files larger than this are read page by page on demand


def napari_get_reader(path):
    """Return :func:`read_tiff` for a ``.tif``/``.tiff`` file napari can show, else None.

    Decides from the file header alone (:func:`core.images.read_header`).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(str(p).lower().endswith(TIFF_SUFFIXES) for p in paths):
        return None
    for p in paths:
        try:
            if read_header(p)[0].n_pages < 1:
                return None
        except (ImageReadError, OSError, ValueError):
            return None
    return read_tiff


def mapping(path: str | Path) -> tuple[int, np.dtype] | None:
    """``(offset, dtype)`` of the pixels of a TIFF's first series when they lie contiguous
    and uncompressed in the file (ImageJ hyperstacks, over 4 GiB included), else None.

    Reads the header only; the dtype carries the file's byte order.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if series.dataoffset is None:
            return None
        return int(series.dataoffset), np.dtype(series.dtype).newbyteorder(tif.byteorder)


def read_tiff(path) -> list[tuple] | None:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        try:
            layers.extend(_read_one(Path(p)))
        except (ImageReadError, OSError, ValueError):
            return None
    return layers or None


def _read_one(path: Path) -> list[tuple]:
    info, _notes = read_header(path)
    lead = tuple(info.shape[info.axes.index(a)] for a in info.page_axes)
    y, x, c = info.page_shape
    nbytes = info.n_pages * y * x * c * np.dtype(info.dtype).itemsize
    lazy = info.n_pages > 1 and nbytes > LAZY_BYTES
    mapped = mapping(path) if lazy else None
    if mapped is not None:
        data = _mapped_pages(path, info, lead, *mapped)
    elif lazy:
        data = _lazy_pages(open_image(path), lead, (y, x, c), info.dtype)  # keeps it open
    else:
        with open_image(path) as f:
            data = np.stack([f.page(i) for i in range(info.n_pages)]).reshape(
                *lead, y, x, c)
    rgb = info.channel_axis == "S" and c in (3, 4) and np.dtype(info.dtype) == np.uint8
    stem = path.name.split(".")[0] if path.name.lower().endswith(".ome.tif") else path.stem
    meta = {"source": str(path), "axes": info.axes, "page_axes": info.page_axes,
            "n_pages": info.n_pages, "n_channels": c, "lazy": lazy,
            "open_id": uuid.uuid4().hex}
    if c == 1:
        return [(data[..., 0], {"name": stem, "metadata": {"microclf": meta}}, "image")]
    if rgb:
        return [(data, {"name": stem, "rgb": True, "metadata": {"microclf": meta}}, "image")]
    kwargs = {
        "channel_axis": data.ndim - 1,
        "name": [f"{stem} [C{i}]" for i in range(c)],
        "metadata": [{"microclf": {**meta, "channel": i}} for i in range(c)],
    }
    return [(data, kwargs, "image")]


def _mapped_pages(path: Path, info, lead: tuple, offset: int, dtype: np.dtype):
    """A dask array ``(*lead, Y, X, C)`` over a memory map of the file, one page per chunk.

    Nothing is read until a chunk is computed; a page reads its own bytes only.
    """
    import dask.array as da

    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=info.shape)
    axes = info.axes
    order = [axes.index(a) for a in info.page_axes] + [axes.index("Y"), axes.index("X")]
    if info.channel_axis:
        order.append(axes.index(info.channel_axis))
    rest = [i for i in range(len(axes)) if i not in order]  # C or S of size 1
    view = mapped.transpose(order + rest)[(Ellipsis, *([0] * len(rest)))]
    if not info.channel_axis:
        view = view[..., None]
    chunks = (1,) * len(lead) + view.shape[len(lead):]
    # an explicit name: dask would otherwise hash the whole array to name it
    return da.from_array(_CopyOut(view), chunks=chunks, name=f"microclf-{uuid.uuid4().hex}")


class _CopyOut:
    """An array-like over a memory map whose slices are copied out of the map.

    ``dask.array.from_array`` copies an array that has a ``copy`` method (a memory map
    included, which would read the whole file); this wrapper has none, so each chunk is
    read when it is computed, and no chunk keeps the map alive.
    """

    def __init__(self, view: np.ndarray):
        self._view = view
        self.shape, self.dtype, self.ndim = view.shape, view.dtype, view.ndim

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._view[key])


def _lazy_pages(f, lead: tuple, page_shape: tuple, dtype: str):
    """A dask array ``(*lead, Y, X, C)`` whose chunks are single pages read on demand."""
    import dask.array as da
    from dask import delayed

    lock = threading.Lock()  # napari may slice from several threads; one file handle

    def read(i):
        with lock:
            return f.page(i)

    pages = [da.from_delayed(delayed(read, pure=True)(i), shape=page_shape, dtype=dtype)
             for i in range(int(np.prod(lead)))]
    return da.stack(pages).reshape(*lead, *page_shape)
