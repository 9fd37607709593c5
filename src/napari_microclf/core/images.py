"""Reading microscopy images page by page, and turning a page into model input.

A *page* here is one 2D image with its channels, shaped ``(Y, X, C)``: one plane of a
Z-stack or time-lapse, one frame of a multi-page TIFF, or a whole PNG. Channels that a TIFF
stores as separate planes (ImageJ / OME ``C`` axis) are gathered back into one page.

Pages of a TIFF are read lazily: opening a multi-GB stack reads its header only, and each
``page(i)`` reads the planes of that page alone.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ImageReadError, one_line

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")

# The smallest page microclf accepts. Each side needs two pixels (resizing interpolates
# between neighbours; a 1-pixel row or column is a profile or an export mistake, not an
# image), and the longer side 8 (below 8 x 8 each pixel would become a block of 28 x 28 or
# more at 224 px: nothing left to classify). A 2 x 20000 line scan passes (with a warning).
MIN_SIDE = 2
MIN_LONG_SIDE = 8


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why a page of ``shape`` (``(Y, X[, C])``) is too small to use, or None."""
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) >= MIN_SIDE and max(h, w) >= MIN_LONG_SIDE:
        return None
    return (
        f"too small: {h} x {w} pixels (height x width); each side needs at least "
        f"{MIN_SIDE} pixels and the longer one at least {MIN_LONG_SIDE}"
    )


def _reason(exc: BaseException, notes: list[str]) -> str:
    """Why a file cannot be read: what tifffile logged first (it names the damage, where the
    exception that follows is often a bare IndexError), then the exception in one short clause
    (imageio's list of plugins to install, tifffile's and Pillow's multi-line texts cut)."""
    clause = one_line(exc, named=True, limit=160)
    return f"{notes[0]}; {clause}" if notes else clause


class _LibraryLog(logging.Filter):
    """Keeps tifffile's log lines (``<tifffile.TiffPages @8> invalid page offset``) from the
    terminal while this thread reads with :func:`library_log`; elsewhere they pass as usual."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        box = getattr(self.local, "box", None)
        if box is None:
            return True
        box.append(re.sub(r"^<tifffile\.\w+ [^>]*>\s*", "", record.getMessage()))
        return False


_LIBRARY_LOG = _LibraryLog()
logging.getLogger("tifffile").addFilter(_LIBRARY_LOG)


@contextmanager
def library_log() -> Iterator[list[str]]:
    """Collect (instead of printing) tifffile's log lines of this thread into a list."""
    outer = getattr(_LIBRARY_LOG.local, "box", None)
    box: list[str] = []
    _LIBRARY_LOG.local.box = box
    try:
        yield box
    finally:
        _LIBRARY_LOG.local.box = outer
        if outer is not None:
            outer.extend(box)


def is_image_file(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Image files of ``paths`` (folders searched recursively, hidden ones skipped), sorted per
    folder; a path that does not exist raises ImageReadError."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and is_image_file(q)
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
        elif p.is_file():
            out.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or folder")
    return out


def find_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """:func:`expand_paths`, and an ImageReadError when there is no image at all."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = expand_paths(paths)
    if not files:
        raise ImageReadError(
            f"no images in {', '.join(str(p) for p in paths)} (looked for "
            f"{', '.join(IMAGE_SUFFIXES)} files); check the folder"
        )
    return files


@dataclass(frozen=True)
class ImageInfo:
    """What a file holds. ``axes`` uses tifffile's letters (e.g. ``TCYX``, ``ZYXS``)."""

    path: str
    axes: str
    shape: tuple[int, ...]
    dtype: str
    n_pages: int
    n_channels: int
    page_axes: str  # the axes that enumerate pages, e.g. "TZ"; "" for a single image
    channel_axis: str | None  # "C" (planes) or "S" (samples in a plane), None for gray
    # the physical size of a pixel in µm, (Z, Y, X), None where the file does not say
    # (OME-XML, ImageJ or resolution tags: see :func:`_tiff_calibration`)
    pixel_size: tuple[float | None, float | None, float | None] = (None, None, None)
    # the channels' names in channel order (OME ``Channel Name``, ImageJ labels), "" where
    # a channel has none; () when the file names none
    channel_names: tuple[str, ...] = ()

    @property
    def page_shape(self) -> tuple[int, int, int]:
        y = self.shape[self.axes.index("Y")]
        x = self.shape[self.axes.index("X")]
        return (y, x, self.n_channels)


def _memmap_series(tif, series) -> np.ndarray | None:
    """``series`` as a read-only memory map, or None unless its data is one contiguous,
    uncompressed block that the file holds in full."""
    offset = getattr(series, "dataoffset", None)
    if offset is None:
        return None
    dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    shape = tuple(series.shape)
    if offset + math.prod(shape) * dtype.itemsize > tif.filehandle.size:
        return None  # truncated: reading says so, naming the file
    return np.memmap(tif.filehandle.path, dtype=dtype, mode="r", offset=offset, shape=shape)


class ImageFile:
    """A lazily read image file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ImageReadError(f"{self.path}: no such file")
        self._tif = None
        self._array: np.ndarray | None = None
        with library_log() as notes:
            try:
                if self.path.stat().st_size == 0:
                    raise ImageReadError(
                        f"{self.path}: empty file (0 bytes); re-export it or remove it"
                    )
                if self.path.suffix.lower() in TIFF_SUFFIXES:
                    self._open_tiff()
                else:
                    self._open_other()
            except ImageReadError:
                self.close()
                raise
            except Exception as exc:  # any decoder error becomes one clear message
                self.close()
                raise ImageReadError(
                    f"{self.path}: cannot read this image ({_reason(exc, notes)}). Is the file "
                    "complete and a TIFF/PNG/JPEG? Re-export it or remove it."
                ) from exc
        self.notes = list(notes)  # what the library said while opening (damaged TIFF tags)

    # -- opening -------------------------------------------------------------------
    def _open_tiff(self) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(self.path)
        series = self._tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        page = series.keyframe
        page_axes_in_plane = page.axes
        n_lead = len(axes) - len(page_axes_in_plane)
        if (
            n_lead < 0
            or axes[n_lead:] != page_axes_in_plane
            or len(series.pages) != math.prod(shape[:n_lead])
        ):
            # An unusual layout (ImageJ's hyperstacks over 4 GiB: one page table entry, the
            # page count in the description): memory-mapped when its pixels lie in one
            # uncompressed block, so a page costs a page; otherwise read whole.
            self._array = _memmap_series(self._tif, series)
            if self._array is None:
                self._array = series.asarray()
            self._set_layout(
                axes,
                shape,
                str(series.dtype),
                lead_shape=None,
                calibration=_tiff_calibration(self._tif, series),
            )
            return
        self._plane_axes = page_axes_in_plane
        self._set_layout(
            axes,
            shape,
            str(series.dtype),
            lead_shape=shape[:n_lead],
            calibration=_tiff_calibration(self._tif, series),
        )

    def _open_other(self) -> None:
        import imageio.v3 as iio

        arr = np.asarray(iio.imread(self.path))
        axes = _other_axes(self.path, arr.shape)
        self._array = arr
        self._set_layout(axes, arr.shape, str(arr.dtype), lead_shape=None)

    def _set_layout(self, axes, shape, dtype, lead_shape, calibration=None) -> None:
        self.info = _layout(self.path, axes, shape, dtype, calibration)
        self._lead_shape = lead_shape

    # -- reading -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.info.n_pages

    def page(self, index: int) -> np.ndarray:
        """Page ``index`` as ``(Y, X, C)`` in the file's dtype."""
        info = self.info
        if not 0 <= index < info.n_pages:
            raise IndexError(f"{self.path}: page {index} out of range (0..{info.n_pages - 1})")
        try:
            if self._array is not None:
                return self._page_from_array(index)
            return self._page_from_tiff(index)
        except (IndexError, ImageReadError):
            raise
        except Exception as exc:
            raise ImageReadError(
                f"{self.path}: page {index} cannot be read ({_reason(exc, [])}); the file may be "
                "truncated"
            ) from exc

    def pages(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.page(i)

    def _page_index(self, index: int) -> dict[str, int]:
        info = self.info
        dims = [info.shape[info.axes.index(a)] for a in info.page_axes]
        coords = np.unravel_index(index, dims) if dims else ()
        return dict(zip(info.page_axes, (int(c) for c in coords), strict=True))

    def _page_from_array(self, index: int) -> np.ndarray:
        info = self.info
        at = self._page_index(index)
        sl = tuple(at.get(a, slice(None)) for a in info.axes)
        sub = self._array[sl]
        sub_axes = "".join(a for a in info.axes if a not in at)
        return _to_yxc(sub, sub_axes)

    def _page_from_tiff(self, index: int) -> np.ndarray:
        info = self.info
        at = self._page_index(index)
        lead_axes = info.axes[: len(self._lead_shape)]
        if info.channel_axis == "C" and "C" in lead_axes:
            keys = []
            for c in range(info.n_channels):
                coords = [c if a == "C" else at.get(a, 0) for a in lead_axes]
                keys.append(int(np.ravel_multi_index(coords, self._lead_shape)))
        else:
            coords = [at.get(a, 0) for a in lead_axes]
            keys = [int(np.ravel_multi_index(coords, self._lead_shape))] if coords else [0]
        planes = [self._tif.series[0].pages[k].asarray() for k in keys]
        if len(planes) > 1:  # channels stored as planes
            return _to_yxc(np.stack(planes, axis=0), "C" + self._plane_axes)
        return _to_yxc(planes[0], self._plane_axes)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _other_axes(path: Path, shape: tuple) -> str:
    """Axes of an array that imageio read (PNG, JPEG, BMP)."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] <= 4:
        return "YXS"
    if len(shape) == 3:  # animated formats: frames first
        return "IYX"
    if len(shape) == 4:
        return "IYXS"
    raise ImageReadError(f"{path}: unsupported image shape {tuple(shape)}")


def _layout(path: Path, axes: str, shape, dtype: str, calibration: dict | None = None) -> ImageInfo:
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"{path}: no Y/X axes found (axes {axes!r}, shape {shape})")
    chan = [a for a in "CS" if a in axes and shape[axes.index(a)] > 1]
    if len(chan) > 1:
        raise ImageReadError(
            f"{path}: both C and S channel axes (axes {axes!r}); save the channels along one axis"
        )
    channel_axis = chan[0] if chan else None
    page_axes = "".join(a for a in axes if a not in "YXCS")
    n_pages = math.prod(shape[axes.index(a)] for a in page_axes)
    n_channels = shape[axes.index(channel_axis)] if channel_axis else 1
    return ImageInfo(
        path=str(path),
        axes=axes,
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        n_pages=int(n_pages),
        n_channels=int(n_channels),
        page_axes=page_axes,
        channel_axis=channel_axis,
        **_fit_calibration(calibration or {}, int(n_channels)),
    )


def _fit_calibration(calibration: dict, n_channels: int) -> dict:
    """The ImageInfo fields of ``calibration``; channel names only when there is one per
    channel and at least one is not empty."""
    out = {}
    if any(v is not None for v in calibration.get("pixel_size", ())):
        out["pixel_size"] = tuple(calibration["pixel_size"])
    names = tuple(calibration.get("channel_names", ()))
    if n_channels > 1 and len(names) == n_channels and any(names):
        out["channel_names"] = names
    return out


def _tiff_data_end(tif, series) -> int:
    """The byte where the series' pixel data ends, from the header (0 if unknown)."""
    if getattr(series, "dataoffset", None) is not None:  # contiguous (ImageJ, shaped)
        return int(series.dataoffset) + int(series.nbytes)
    end = 0
    pages = series.pages
    for page in {id(p): p for p in (pages[0], pages[len(pages) - 1]) if p is not None}.values():
        offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
        if offsets and counts:
            end = max(end, max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False)))
    return end


# micrometres per unit, for the length units OME-XML and ImageJ write (lower case)
_UM_PER_UNIT = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "pm": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "in": 25400.0,
    "inch": 25400.0,
}
_RESUNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit: centimeter, millimeter, µm


def _um_per(unit) -> float | None:
    """Micrometres in one ``unit`` ("micron", "\\u00B5m", "nm", ...), None if not a length."""
    if not isinstance(unit, str):
        return None
    text = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("\u03bc", "µ")
    return _UM_PER_UNIT.get(text.lower())


def _size_um(value, unit) -> float | None:
    """``value`` in ``unit`` as µm, None unless a positive, finite length."""
    factor = _um_per(unit)
    try:
        size = float(value) * factor if factor is not None and value is not None else None
    except (TypeError, ValueError):
        return None
    return size if size is not None and math.isfinite(size) and size > 0 else None


def _per_pixel(tag, unit_factor: float | None) -> float | None:
    """A pixel's size in µm from an X/YResolution tag (pixels per unit, a rational)."""
    if tag is None or unit_factor is None:
        return None
    value = tag.value
    num, den = value if isinstance(value, tuple) else (value, 1)
    try:
        return _size_um(float(den) / float(num) * unit_factor, "µm")
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _tiff_calibration(tif, series) -> dict:
    """Pixel size (Z, Y, X) in µm and channel names, from the header of ``tif``.

    In order: OME-XML (``Pixels`` ``PhysicalSizeX/Y/Z`` with their units, µm when unnamed;
    ``Channel`` ``Name``); ImageJ's description (``unit``, ``yunit``, ``zunit``; X and Y
    from the resolution tags, Z from ``spacing``; channel names from the ``Labels`` when
    the planes of each channel share one label); else the resolution tags of a plain TIFF
    in centimetres, millimetres or micrometres (never inches: that is a photo's dpi). A unit
    that is not a length, or a value that cannot be read, leaves that size out: the pixel
    size is a help, never a reason to refuse a file.
    """
    page = series.keyframe
    tags = page.tags
    if tif.is_ome:
        return _ome_calibration(tif.ome_metadata)
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = meta.get("unit")
        x = _per_pixel(tags.get("XResolution"), _um_per(unit))
        y = _per_pixel(tags.get("YResolution"), _um_per(meta.get("yunit", unit)))
        z = _size_um(meta.get("spacing"), meta.get("zunit", unit)) if "Z" in series.axes else None
        return {"pixel_size": (z, y, x), "channel_names": _imagej_channel_names(series, meta)}
    factor = _RESUNIT_UM.get(int(getattr(page, "resolutionunit", 1) or 1))
    return {
        "pixel_size": (
            None,
            _per_pixel(tags.get("YResolution"), factor),
            _per_pixel(tags.get("XResolution"), factor),
        )
    }


def _ome_calibration(xml: str | None) -> dict:
    """Pixel size in µm and channel names of the first ``Image`` of an OME-XML text."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    size = {
        a: _size_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm"))
        for a in "ZYX"
    }
    names = tuple(el.get("Name") or "" for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel")
    return {
        "pixel_size": (size["Z"], size["Y"] or size["X"], size["X"] or size["Y"]),
        "channel_names": names,
    }


def _imagej_channel_names(series, meta: dict) -> tuple[str, ...]:
    """ImageJ's slice labels as channel names, when every plane of a channel has the same
    one (Bio-Formats and Fiji name channels this way); per-slice labels are not names."""
    labels = meta.get("Labels")
    axes = series.axes
    if not isinstance(labels, (list, tuple)) or "C" not in axes:
        return ()
    lead = tuple(series.shape[: axes.index("Y")])
    lead_axes = axes[: axes.index("Y")]
    n = series.shape[axes.index("C")]
    if len(labels) == n:
        return tuple(str(v) for v in labels)
    if len(labels) != math.prod(lead):
        return ()
    by_channel = np.moveaxis(
        np.asarray(labels, dtype=object).reshape(lead), lead_axes.index("C"), 0
    ).reshape(n, -1)
    if any(len(set(row)) != 1 for row in by_channel):
        return ()
    return tuple(str(row[0]) for row in by_channel)


_MODE_LAYOUT: dict[str, tuple[tuple[int, ...], str]] = {}


def _pillow_header(path: Path) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of a PNG/JPEG/BMP as imageio reads it, from Pillow's header (a tenth
    of ``imageio.v3.improps``' time); a PNG's chunks are checked too (a truncated file)."""
    from PIL import Image

    with Image.open(path) as im:
        mode = im.palette.mode if im.mode == "P" and im.palette is not None else im.mode
        if mode not in _MODE_LAYOUT:
            dummy = np.asarray(Image.new(mode, (1, 1)))
            _MODE_LAYOUT[mode] = (dummy.shape[2:], str(dummy.dtype))
        channels, dtype = _MODE_LAYOUT[mode]
        shape = (im.height, im.width, *channels)
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1 and (im.format == "GIF" or im.custom_mimetype == "image/apng"):
            shape = (n_frames, *shape)  # imageio reads every frame of these
        if im.format == "PNG":
            im.verify()
    return tuple(int(s) for s in shape), dtype


def read_header(path: str | Path) -> tuple[ImageInfo, list[str]]:
    """What a file holds, from its header alone: ``(info, notes)``, no pixel data decoded.

    TIFF: tifffile's series (axes, shape, dtype), and whether the pixel data the header
    points to lies within the file (a truncated file is refused here). PNG/JPEG/BMP:
    imageio's properties (Pillow reads the header only). ``notes`` holds what tifffile logged
    (a damaged page list, say), condensed. Raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    with library_log() as notes:
        try:
            size = path.stat().st_size
            if size == 0:
                raise ImageReadError(f"{path}: empty file (0 bytes)")
            if path.suffix.lower() in TIFF_SUFFIXES:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    series = tif.series[0]
                    info = _layout(
                        path,
                        series.axes,
                        tuple(series.shape),
                        str(series.dtype),
                        _tiff_calibration(tif, series),
                    )
                    end = _tiff_data_end(tif, series)
                if end > size:
                    raise ImageReadError(
                        f"{path}: truncated (its pixel data should end at byte "
                        f"{end:,} but the file has {size:,} bytes)"
                    )
            else:
                shape, dtype = _pillow_header(path)
                info = _layout(path, _other_axes(path, shape), shape, dtype)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot read this image ({_reason(exc, notes)})") from exc
    return info, list(notes)


def _to_yxc(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reorder an array with ``axes`` (a subset of Y, X, C, S and size-1 others) to YXC."""
    keep = [i for i, a in enumerate(axes) if a in "YXCS" or arr.shape[i] != 1]
    extra = [axes[i] for i in keep if axes[i] not in "YXCS"]
    if extra:
        raise ImageReadError(f"unexpected extra axes {extra} in a page (axes {axes!r})")
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a in "CS"]
    arr = np.transpose(arr, order)
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 4:  # both C and S of size > 1 is refused earlier; merge the rest
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return arr


def open_image(path: str | Path) -> ImageFile:
    """Open ``path`` for lazy page reading (PNG, JPEG, TIFF incl. multi-page and OME)."""
    return ImageFile(path)


def read_page(path: str | Path, index: int = 0) -> np.ndarray:
    with open_image(path) as f:
        return f.page(index)


def array_pages(array: np.ndarray, page_axis: int | None) -> np.ndarray | None:
    """The pages of an in-memory ``array``: None when it is one image (``page_axis`` None),
    else the array with its pages along axis 0. A shape that is neither raises an
    :class:`ImageReadError` that says how to call it."""
    if page_axis is None:
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= 4)):
            raise ImageReadError(
                f"an array of shape {array.shape} is not one image ((Y, X) or (Y, X, C) "
                "with C <= 4); for a stack of pages say which axis enumerates them, "
                "e.g. page_axis=0"
            )
        return None
    try:
        stack = np.moveaxis(array, page_axis, 0)
    except ValueError as exc:  # numpy's AxisError
        raise ImageReadError(
            f"page_axis={page_axis} does not exist in an array of shape {array.shape}"
        ) from exc
    if stack.ndim not in (3, 4):
        raise ImageReadError(
            f"a stack of shape {array.shape} with page_axis={page_axis} has pages of shape "
            f"{stack.shape[1:]}; each page must be (Y, X) or (Y, X, C)"
        )
    return stack


def count_pages(path: str | Path) -> int:
    """Pages in ``path``, from its header (:func:`read_header`; no pixel data decoded)."""
    return read_header(path)[0].n_pages


# -- preprocessing ----------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """How a page becomes the model's ``(size, size, 3)`` float input in [0, 255].

    - ``intensity``: ``"auto"`` (the default) keeps the range of 8-bit images (``"fixed"``:
      0-255 stays 0-255, so brightness still tells classes apart) and stretches every other
      dtype by percentiles (a 12-bit camera in a 16-bit container uses a narrow part of its
      range); measured in docs/validity.md. ``"percentile"`` maps the per-channel percentiles
      ``pmin``/``pmax`` to 0 and 255 (then clips), so a 12-bit image in a 16-bit container
      and an 8-bit image look alike to the model; where the two percentiles coincide (a small
      bright object on an empty background) the channel's min and max are used instead, so a
      sparse image is not blanked. ``"fixed"`` keeps absolute intensities, for classes that
      differ in brightness: ``intensity_range`` (``(min, max)``) or, when it is None, the
      dtype's range (0-255 for 8-bit, 0-65535 for 16-bit, 0-1 for float and bool) maps to
      0-255.
    - ``channel_map``: which source channel feeds R, G and B; ``None`` in a slot is black.
      ``None`` as a whole means automatic: gray is repeated to 3 channels, 2 channels become
      (ch0, ch1, black), 3 channels stay, 4 or more keep the first three.
    - ``resize_mode``: ``"pad"`` pads the shorter side with black to a square, then resizes,
      so shapes keep their proportions and nothing is cropped; ``"stretch"`` resizes each
      side independently.
    """

    image_size: int = 224
    pmin: float = 1.0
    pmax: float = 99.8
    channel_map: tuple[int | None, int | None, int | None] | None = None
    resize_mode: str = "pad"
    intensity: str = "auto"
    intensity_range: tuple[float, float] | None = None

    def __post_init__(self):
        size = self.image_size
        whole = isinstance(size, (int, float, np.number)) and float(size).is_integer()
        if isinstance(size, bool) or not whole:
            raise ValueError(f"image size must be a whole number of pixels, got {size!r}")
        size = int(size)
        object.__setattr__(self, "image_size", size)
        if not 8 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image size must be 8 to {MAX_IMAGE_SIZE} pixels, got {size} (EfficientNet "
                "is made for 224; beyond a few hundred it only costs memory)"
            )
        for name in ("pmin", "pmax"):
            if isinstance(getattr(self, name), bool) or not isinstance(
                getattr(self, name), (int, float, np.number)
            ):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0 <= self.pmin < self.pmax <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= pmin < pmax <= 100, got {self.pmin}, {self.pmax}"
            )
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.intensity_range is not None:
            lo, hi = (float(v) for v in self.intensity_range)
            if not hi > lo:
                raise ValueError(f"intensity range needs MIN < MAX, got {lo}, {hi}")
            object.__setattr__(self, "intensity_range", (lo, hi))
        if self.resize_mode not in ("pad", "stretch"):
            raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {self.resize_mode!r}")
        if self.channel_map is not None:
            cm = tuple(self.channel_map)
            if len(cm) != 3 or any(c is not None and (int(c) != c or c < 0) for c in cm):
                raise ValueError(f"channel_map needs 3 entries of channel index or None, got {cm}")
            object.__setattr__(self, "channel_map", cm)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("channel_map", "intensity_range"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        """The spec stored in a bundle; keys a bundle predates take their defaults."""
        d = dict(d)
        for k in ("channel_map", "intensity_range"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        d.setdefault("intensity", "percentile")  # bundles from before "auto" stretched all
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def normalize(self, page: np.ndarray) -> np.ndarray:
        """``(Y, X, C)`` page to float32 in [0, 255] by this spec's intensity mode."""
        spec = self.resolved(np.asarray(page).dtype)
        if spec.intensity == "fixed":
            return normalize_fixed(page, spec.intensity_range)
        return normalize_percentile(page, spec.pmin, spec.pmax)

    def resolved(self, dtype) -> PreprocessSpec:
        """This spec for a page of ``dtype``: ``"auto"`` becomes ``"fixed"`` (the dtype's
        range) for 8-bit and boolean pages and ``"percentile"`` for any other dtype."""
        if self.intensity != "auto":
            return self
        if keeps_range(dtype):
            return replace(self, intensity="fixed", intensity_range=dtype_range(dtype))
        return replace(self, intensity="percentile")


INTENSITY_MODES = ("auto", "percentile", "fixed")
MAX_IMAGE_SIZE = 1024  # a model input side; one 1024 px batch of 32 already takes ~3 GB


def keeps_range(dtype) -> bool:
    """Whether ``intensity="auto"`` keeps a dtype's own range: 8-bit and boolean pages."""
    return np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(bool))


def parse_intensity(text: str | None) -> tuple[str, tuple[float, float] | None]:
    """``"auto"`` | ``"percentile"`` | ``"fixed"`` | ``"fixed:MIN,MAX"`` (or ``"MIN,MAX"``) ->
    (mode, range)."""
    text = (text or "auto").strip().lower()
    if text in INTENSITY_MODES:
        return text, None
    rng = text.removeprefix("fixed").lstrip(":= ")
    try:
        lo, hi = (float(v) for v in rng.split(","))
    except ValueError:
        raise ValueError(
            f"intensity must be 'auto', 'percentile', 'fixed' or 'fixed:MIN,MAX' (e.g. "
            f"'fixed:0,4095'), got {text!r}"
        ) from None
    if not hi > lo:
        raise ValueError(f"intensity range needs MIN < MAX, got {text!r}")
    return "fixed", (lo, hi)


def parse_channel_map(text: str | None) -> tuple[int | None, int | None, int | None] | None:
    """``"auto"`` -> None; ``"0,1,-"`` -> (0, 1, None)."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"channel map needs three entries like '0,1,-', got {text!r}")
    return tuple(None if p in ("-", "none", "") else int(p) for p in parts)  # type: ignore


def normalize_percentile(page: np.ndarray, pmin: float = 1.0, pmax: float = 99.8) -> np.ndarray:
    """Per-channel percentile normalisation of a ``(Y, X, C)`` page to float32 in [0, 255].

    Where the two percentiles coincide (a few bright pixels on an empty background) the
    channel's min and max are used instead, so a sparse image keeps its object. A constant
    channel (no contrast at all) becomes 0; NaN/inf pixels take the darkest finite value.
    """
    page = np.asarray(page)
    if page.ndim == 2:
        page = page[..., None]
    out = np.empty(page.shape, dtype=np.float32)
    for c in range(page.shape[-1]):
        ch = page[..., c]
        if ch.dtype == bool:  # a mask: numpy cannot subtract booleans
            ch = ch.view(np.uint8)
        if ch.dtype.kind == "f":
            finite = np.isfinite(ch)
            if not finite.all():
                ch = np.where(finite, ch, ch[finite].min() if finite.any() else 0.0)
        # percentiles on the native dtype: cheaper than on a float copy
        lo, hi = np.percentile(ch, [pmin, pmax])
        if not hi > lo:  # sparse: the percentiles see only background
            lo, hi = ch.min(), ch.max()
        o = out[..., c]
        np.subtract(ch, np.float32(lo), out=o, casting="unsafe")
        if hi > lo:
            o *= np.float32(255.0 / (hi - lo))
        else:
            o[...] = 0.0
    np.clip(out, 0.0, 255.0, out=out)
    return out


def dtype_range(dtype) -> tuple[float, float]:
    """The intensity range a dtype can hold: integers their full range, float and bool 0-1."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def normalize_fixed(page: np.ndarray, intensity_range=None) -> np.ndarray:
    """Map ``intensity_range`` (or the dtype's range) of every channel to [0, 255], clipped.

    Absolute intensities survive: a dim and a bright image of the same shape stay apart.
    """
    page = np.asarray(page)
    if page.ndim == 2:
        page = page[..., None]
    lo, hi = intensity_range if intensity_range is not None else dtype_range(page.dtype)
    out = page.astype(np.float32)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=lo, posinf=hi, neginf=lo)
    out -= np.float32(lo)
    out *= np.float32(255.0 / (hi - lo))
    np.clip(out, 0.0, 255.0, out=out)
    return out


def _auto_channel_map(n: int) -> tuple[int | None, int | None, int | None]:
    if n == 1:
        return (0, 0, 0)
    if n == 2:
        return (0, 1, None)
    return (0, 1, 2)


def _check_channel_map(channel_map, n: int):
    channel_map = _auto_channel_map(n) if channel_map is None else tuple(channel_map)
    bad = [c for c in channel_map if c is not None and c >= n]
    if bad:
        raise ImageReadError(
            f"channel map {list(channel_map)} asks for channel {bad[0]} but the image has "
            f"{n} channel(s); choose a channel map within 0..{n - 1}"
        )
    return channel_map


def select_channels(page: np.ndarray, channel_map=None) -> np.ndarray:
    """Pick/arrange channels of a ``(Y, X, C)`` page into 3 channels (see PreprocessSpec)."""
    if page.ndim == 2:
        page = page[..., None]
    channel_map = _check_channel_map(channel_map, page.shape[-1])
    zeros = np.zeros(page.shape[:2], dtype=page.dtype)
    return np.stack([page[..., c] if c is not None else zeros for c in channel_map], axis=-1)


def resize_plane(plane: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resize a 2D float plane to ``(size, size)`` without cropping (pad or stretch).

    ``"pad"`` scales the long side to ``size`` (keeping the aspect ratio), then pads the short
    side with black, centred: the work is that of the output, not of a padded square (a 2 x
    20000 line scan is never turned into a 20000 x 20000 square). A square plane gives what
    padding first gave.
    """
    from skimage.transform import resize

    h, w = plane.shape
    long_side = max(h, w)
    if mode == "pad" and h != w:
        shape = (max(1, round(h * size / long_side)), max(1, round(w * size / long_side)))
    else:
        shape = (size, size)
    if plane.shape == shape:
        out = plane.astype(np.float32, copy=False)
    else:
        # Smoothing before downscaling by 1.5x or more; below that skimage's Gaussian (sigma =
        # (factor - 1) / 2 < 0.25) changes no pixel by more than 0.1%, and costs 25% of the time.
        out = resize(
            plane, shape, order=1, anti_aliasing=long_side >= 1.5 * size, preserve_range=True
        ).astype(np.float32, copy=False)
    if shape == (size, size):
        return out
    padded = np.zeros((size, size), np.float32)
    y0, x0 = (size - shape[0]) // 2, (size - shape[1]) // 2
    padded[y0 : y0 + shape[0], x0 : x0 + shape[1]] = out
    return padded


MAX_ASPECT = 20  # above this, padding to a square leaves a thin line: aspect_warning says so


def aspect_warning(shape: Sequence[int], path: str | Path | None = None) -> str | None:
    """A warning for a page whose sides differ more than ``MAX_ASPECT``-fold, else None.

    ``shape`` is ``(Y, X[, C])``; the message names ``path`` and says what to do.
    """
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < 1 or max(h, w) <= MAX_ASPECT * min(h, w):
        return None
    ratio = max(h, w) / min(h, w)
    ratio_text = f"{ratio:.0f}" if ratio >= 100 else f"{ratio:.1f}".removesuffix(".0")
    return (
        f"{path if path is not None else 'image'}: {h} x {w} pixels (height x width, "
        f"aspect ratio {ratio_text}:1) \u2014 padded to a square it becomes a thin line; "
        "crop or tile such images"
    )


def preprocess(page: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One page (``(Y, X)`` or ``(Y, X, C)``, any dtype) to ``(S, S, 3)`` float32 in [0, 255].

    Each source channel used is normalised and resized once (a gray page once, not three
    times), then placed into R, G and B by the channel map.
    """
    page = np.asarray(page)
    if page.ndim == 2:
        page = page[..., None]
    if page.ndim != 3:
        raise ImageReadError(
            f"expected a 2D image with optional channels (Y, X[, C]), got shape {page.shape}"
        )
    problem = shape_problem(page.shape)
    if problem is not None:
        raise ImageReadError(problem)
    channel_map = _check_channel_map(spec.channel_map, page.shape[-1])
    size = spec.image_size
    out = np.zeros((size, size, 3), np.float32)
    done: dict[int, int] = {}
    for slot, c in enumerate(channel_map):
        if c is None:
            continue
        if c in done:
            out[..., slot] = out[..., done[c]]
            continue
        plane = spec.normalize(page[..., c : c + 1])[..., 0]
        out[..., slot] = resize_plane(plane, size, spec.resize_mode)
        done[c] = slot
    return out


@dataclass
class PageRef:
    """One page of one file: the unit of training and prediction."""

    path: Path
    page: int = 0
    label: int | None = None
    meta: dict = field(default_factory=dict)


def preprocess_refs(
    refs: Sequence[PageRef], spec: PreprocessSpec, on_progress=None, should_stop=None
) -> np.ndarray | None:
    """Read and preprocess pages into one ``(N, S, S, 3)`` float32 array (each file opened once).

    ``on_progress(done, total)`` is called after each page; returns None if ``should_stop()``.
    """
    s = spec.image_size
    out = np.empty((len(refs), s, s, 3), dtype=np.float32)
    order = sorted(range(len(refs)), key=lambda i: (str(refs[i].path), refs[i].page))
    current: ImageFile | None = None
    try:
        for done, i in enumerate(order, 1):
            ref = refs[i]
            if current is None or current.path != Path(ref.path):
                if current is not None:
                    current.close()
                current = open_image(ref.path)
            try:
                out[i] = preprocess(current.page(ref.page), spec)
            except ImageReadError as exc:
                msg = str(exc)
                raise ImageReadError(msg if str(ref.path) in msg else f"{ref.path}: {msg}") from exc
            if on_progress is not None:
                on_progress(done, len(refs))
            if should_stop is not None and should_stop():
                return None
    finally:
        if current is not None:
            current.close()
    return out
