"""From napari image layers to pages: which page is in view, a page's pixels, channel groups.

A layer's last two axes (three for RGB) are the image; the axes before them enumerate its
pages (a Z-stack, a time-lapse, ...), numbered in C order like :mod:`core.images` does.

A layer made of pages of several files (error review, label next) names the file and page
behind each of its pages in ``metadata["microclf"]["origins"]``: its pixels are for display
(each page normalised, padded), and :class:`PageSource` reads the original page from its file,
so an example added from it is the file's own page with the file as its provenance.

Multichannel images arrive as several layers (napari's ``channel_axis``). Layers that the
plugin's reader made from one file carry ``metadata["microclf"]["channel"]`` and the
``open_id`` of that opening; together they form a *channel group* and a page of the group
is ``(Y, X, C)`` with the channels in file order. Any other layer is used alone (one gray
or one RGB image per page).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def image_layers(viewer) -> list:
    """The image layers to classify or annotate (not the heatmaps Explain adds)."""
    from napari.layers import Image

    return [lyr for lyr in viewer.layers
            if isinstance(lyr, Image) and "heatmap" not in _meta(lyr)]


def _data(layer):
    return layer.data[0] if layer.multiscale else layer.data


def lead_shape(layer) -> tuple[int, ...]:
    """Shape of the page axes: ``()`` for a 2D image, ``(Z,)`` for a stack, ..."""
    # layer.ndim leaves out the colour axis of an RGB layer
    return tuple(int(s) for s in _data(layer).shape[: max(layer.ndim - 2, 0)])


def n_pages(layer) -> int:
    return int(np.prod(lead_shape(layer))) if lead_shape(layer) else 1


def _meta(layer) -> dict:
    meta = layer.metadata.get("microclf", {}) if isinstance(layer.metadata, dict) else {}
    return meta if isinstance(meta, dict) else {}


def source_of(layer) -> str:
    """A file path when the layer came from one, else the layer name (for provenance)."""
    return str(_meta(layer).get("source") or layer.source.path or layer.name)


def channel_group(viewer, layer) -> list:
    """The layers holding the channels of ``layer``'s image, in channel order.

    The channel layers of one opening of a file share ``open_id``: the same file opened
    twice gives two groups that never mix (layers from before ``open_id`` are matched by
    source path). One layer per channel: ``layer`` for its own, the first in the layer
    list for the others (a duplicated layer copies its metadata).
    """
    meta = _meta(layer)
    if "channel" not in meta or layer.rgb:
        return [layer]

    def same_image(other) -> bool:
        m = _meta(other)
        if "channel" not in m or _data(other).shape != _data(layer).shape:
            return False
        if "open_id" in meta or "open_id" in m:
            return m.get("open_id") == meta.get("open_id")
        return m.get("source") == meta.get("source")

    by_channel: dict = {}
    for lyr in [layer, *(o for o in image_layers(viewer) if same_image(o))]:
        by_channel.setdefault(_meta(lyr)["channel"], lyr)
    return [by_channel[c] for c in sorted(by_channel)]


def page_in_view(viewer, layer) -> tuple[int, ...]:
    """Index of the page the dims sliders show for ``layer`` (``()`` for a 2D image)."""
    shape = lead_shape(layer)
    if not shape:
        return ()
    coords = layer.world_to_data(viewer.dims.point)[: len(shape)]
    return tuple(int(np.clip(round(float(c)), 0, s - 1)) for c, s in zip(coords, shape,
                                                                           strict=True))


def flat_page(layer, index: tuple[int, ...]) -> int | None:
    """The page number (C order) of ``index``, None for a 2D image."""
    shape = lead_shape(layer)
    return int(np.ravel_multi_index(index, shape)) if shape else None


def page_index(layer, page: int) -> tuple[int, ...]:
    shape = lead_shape(layer)
    return tuple(int(i) for i in np.unravel_index(page, shape)) if shape else ()


def show_page(viewer, layer, page: int) -> None:
    """Move the dims sliders to page ``page`` (C order) of ``layer``, through its transforms."""
    index = page_index(layer, page)
    world = layer.data_to_world([*index, 0, 0])
    offset = viewer.dims.ndim - len(world)
    for axis, value in enumerate(world[: len(index)]):
        viewer.dims.set_point(axis + offset, value)


@dataclass(frozen=True)
class PageSource:
    """A snapshot of what is needed to read pages, safe to hand to a worker thread.

    It holds references to the layers' arrays, never the layers themselves.
    """

    name: str  # the layer name (the group's first layer for channels)
    source: str
    arrays: tuple  # one array per channel layer (or the one layer)
    lead: tuple[int, ...]
    origins: tuple = ()  # per page {"file", "page"} for a layer made of several files' pages

    @property
    def n_pages(self) -> int:
        return int(np.prod(self.lead)) if self.lead else 1

    def page(self, page: int) -> np.ndarray:
        """Pixels of page ``page``: ``(Y, X)``, ``(Y, X, 3)`` RGB or ``(Y, X, C)``."""
        if self.origins:
            from ..core.images import read_page

            o = self.origins[page]
            return read_page(o["file"], int(o["page"]))
        index = tuple(int(i) for i in np.unravel_index(page, self.lead)) if self.lead else ()
        planes = [np.asarray(a[index]) for a in self.arrays]
        return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


    def origin(self, page: int | None) -> tuple[str, int | None]:
        """The provenance of page ``page``: (source file or name, page in that source)."""
        if self.origins:
            o = self.origins[page or 0]
            single = o.get("pages") == 1  # a page of a one-page file is the file itself
            return str(o["file"]), None if single else int(o["page"])
        return self.source, page


def origins_of(layer) -> tuple:
    """The per-page files of a layer made of several files' pages (else ``()``)."""
    origins = _meta(layer).get("origins") or ()
    return tuple(origins) if len(origins) == n_pages(layer) else ()


def page_source(viewer, layer) -> PageSource:
    origins = origins_of(layer)
    group = [layer] if origins else channel_group(viewer, layer)
    return PageSource(group[0].name, source_of(group[0]), tuple(_data(lyr) for lyr in group),
                      lead_shape(group[0]), origins)


def group_label(group: list) -> str:
    if len(group) == 1:
        return group[0].name
    return f"{len(group)} channel layers of {source_of(group[0])}"
