"""napari reader for TIFF images and stacks (multi-page, ImageJ, OME; multichannel).

Pages are read with :func:`napari_microclf.core.images.open_image`. A file above
``LAZY_BYTES`` becomes a dask array built page by page, so a multi-GB stack opens after
reading its header only and each slider move reads one page. Channels (``C`` planes, or
``S`` samples that are not RGB) become one layer per channel through ``channel_axis``; every
channel layer carries ``metadata["microclf"]`` with the source path, the channel and the
page axes, which is how the Annotate and Predict widgets put the channels back together.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .core.images import TIFF_SUFFIXES, ImageReadError, open_image

LAZY_BYTES = 256 * 2**20  # files larger than this are read page by page on demand


def napari_get_reader(path):
    """Return :func:`read_tiff` for a ``.tif``/``.tiff`` file napari can show, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(str(p).lower().endswith(TIFF_SUFFIXES) for p in paths):
        return None
    for p in paths:
        try:
            with open_image(p) as f:
                if f.info.n_pages < 1:
                    return None
        except (ImageReadError, OSError, ValueError):
            return None
    return read_tiff


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
    f = open_image(path)
    info = f.info
    lead = tuple(info.shape[info.axes.index(a)] for a in info.page_axes)
    y, x, c = info.page_shape
    itemsize = np.dtype(info.dtype).itemsize
    lazy = info.n_pages > 1 and info.n_pages * y * x * c * itemsize > LAZY_BYTES
    if lazy:
        data = _lazy_pages(f, lead, (y, x, c), info.dtype)  # keeps ``f`` open for dask
    else:
        with f:
            data = np.stack([f.page(i) for i in range(info.n_pages)]).reshape(
                *lead, y, x, c)
    rgb = info.channel_axis == "S" and c in (3, 4) and np.dtype(info.dtype) == np.uint8
    stem = path.name.split(".")[0] if path.name.lower().endswith(".ome.tif") else path.stem
    meta = {"source": str(path), "axes": info.axes, "page_axes": info.page_axes,
            "n_pages": info.n_pages, "n_channels": c, "lazy": lazy}
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
