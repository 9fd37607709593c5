"""napari reader for TIFF images and stacks (multi-page, ImageJ, OME; multichannel).

Claiming a file reads its header only (the IFDs and the ImageJ/OME description, never pixel
data), so napari asks this reader about a 50 GB stack as fast as about a 5 kB one.

A file whose pixels take more than :func:`lazy_threshold` bytes (the smaller of 1 GiB and
an eighth of the memory available when it is opened) is opened lazily, as a dask array with
one page per chunk, so it opens after reading its header and each slider move reads one
page:

- pixels stored contiguously and uncompressed (ImageJ hyperstacks, including ImageJ files
  over 4 GiB, which hold one IFD and a page count in their description only) are
  memory-mapped;
- other files (compressed, tiled, scattered pages) are read page by page through
  :func:`napari_microclf.core.images.open_image`.

Smaller files are read into memory. Channels (``C`` planes, or ``S`` samples that are not
RGB) become one layer per channel through ``channel_axis``, named ``"<stem> [<channel
name>]"`` when the file names its channels (OME ``Channel Name``, ImageJ labels) and
``"<stem> [C<i>]"`` otherwise; every layer carries ``metadata["microclf"]`` with the source
path, the channel and its name, the page axes and an ``open_id`` shared by the channel
layers of one opening only, which is how the Annotate and Predict widgets put the channels
of one image back together (and keep two openings of one file apart).

A file that states its pixel size (OME-XML ``PhysicalSizeX/Y/Z``, ImageJ's resolution,
``unit`` and ``spacing``, or resolution tags in cm/mm/µm: see
:func:`napari_microclf.core.images.read_header`) gives its layers a ``scale`` in µm on the
Y and X axes, and on Z when Z is a page axis (1 on the other page axes), with napari
``units`` to match and ``metadata["microclf"]["pixel_size"]`` and ``["unit"]``.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np

from .core.device import available_memory
from .core.images import TIFF_SUFFIXES, ImageReadError, open_image, read_header

# Files whose pixels take more bytes than lazy_threshold() are read page by page on demand.
LAZY_BYTES: int | None = None  # None: automatic (lazy_threshold); a number fixes the threshold
LAZY_MAX_BYTES = 2**30  # never read more than this into memory at opening
LAZY_MEMORY_FRACTION = 8  # nor more than 1/8 of the available memory
LAZY_FALLBACK_BYTES = 256 * 2**20  # when the available memory cannot be known


def lazy_threshold() -> int:
    """Pixel bytes above which a file is opened lazily.

    ``LAZY_BYTES`` when set; otherwise ``min(LAZY_MAX_BYTES, available / LAZY_MEMORY_FRACTION)``
    (256 MiB when the available memory is unknown). An eighth because opening in memory
    holds the file's pixels twice for a moment (the pages, then their stack) and napari and
    a training run need the rest; at most 1 GiB because reading more before the first page
    shows takes seconds, where a lazy opening shows it at once. A 2 GiB stack thus opens in
    memory on no machine, a 500 MiB one on a machine with 4 GiB or more available.
    """
    if LAZY_BYTES is not None:
        return int(LAZY_BYTES)
    available = available_memory()
    if available is None:
        return LAZY_FALLBACK_BYTES
    return int(min(LAZY_MAX_BYTES, available // LAZY_MEMORY_FRACTION))


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
    lazy = info.n_pages > 1 and nbytes > lazy_threshold()
    mapped = mapping(path) if lazy else None
    if mapped is not None:
        data = _mapped_pages(path, info, lead, *mapped)
    elif lazy:
        data = _lazy_pages(open_image(path), lead, (y, x, c), info.dtype)  # keeps it open
    else:
        with open_image(path) as f:
            data = np.stack([f.page(i) for i in range(info.n_pages)]).reshape(*lead, y, x, c)
    rgb = info.channel_axis == "S" and c in (3, 4) and np.dtype(info.dtype) == np.uint8
    stem = path.name.split(".")[0] if path.name.lower().endswith(".ome.tif") else path.stem
    meta = {
        "source": str(path),
        "axes": info.axes,
        "page_axes": info.page_axes,
        "n_pages": info.n_pages,
        "n_channels": c,
        "lazy": lazy,
        "open_id": uuid.uuid4().hex,
    }
    spatial = _spatial(info)
    if spatial:
        meta["pixel_size"], meta["unit"] = spatial["pixel_size"], "µm"
    if info.channel_names:
        meta["channel_names"] = list(info.channel_names)
    layer = spatial.get("layer", {})  # scale and units
    if c == 1:
        return [(data[..., 0], {"name": stem, "metadata": {"microclf": meta}, **layer}, "image")]
    if rgb:
        return [
            (data, {"name": stem, "rgb": True, "metadata": {"microclf": meta}, **layer}, "image")
        ]
    names = _channel_names(info)
    kwargs = {
        "channel_axis": data.ndim - 1,
        "name": [f"{stem} [{name}]" for name in names],
        "metadata": [
            {"microclf": {**meta, "channel": i, "channel_name": name}}
            for i, name in enumerate(names)
        ],
        **{k: [v] * c for k, v in layer.items()},  # one per channel layer
    }
    return [(data, kwargs, "image")]


def _channel_names(info) -> list[str]:
    """The file's channel names, ``C<i>`` for a channel without one or with a name another
    channel has too (layer names and the channel order must stay unambiguous)."""
    names = list(info.channel_names) or [""] * info.n_channels
    out = []
    for i, name in enumerate(names):
        name = " ".join(str(name).split())
        out.append(name if name and names.count(name) == 1 else f"C{i}")
    return out


def _spatial(info) -> dict:
    """The layer's ``scale`` and ``units`` (page axes, then Y, X) from the file's pixel size,
    and that size by axis for the metadata; ``{}`` when the file states none."""
    z, y, x = info.pixel_size
    if y is None and x is None:
        return {}
    y, x = y or x, x or y  # one side stated: square pixels
    lead = [(z if a == "Z" and z is not None else None) for a in info.page_axes]
    scale = tuple(1.0 if s is None else float(s) for s in [*lead, y, x])
    units = tuple("pixel" if s is None else "µm" for s in [*lead, y, x])
    size = {"Y": float(y), "X": float(x)}
    if z is not None:
        size = {"Z": float(z), **size}
    return {"pixel_size": size, "layer": {"scale": scale, "units": units}}


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
    chunks = (1,) * len(lead) + view.shape[len(lead) :]
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

    pages = [
        da.from_delayed(delayed(read, pure=True)(i), shape=page_shape, dtype=dtype)
        for i in range(int(np.prod(lead)))
    ]
    return da.stack(pages).reshape(*lead, *page_shape)
