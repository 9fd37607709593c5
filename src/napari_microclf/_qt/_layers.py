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
is ``(Y, X, C)`` with the channels in file order. The channel layers another reader made
from one file are grouped by napari's ``layer.source`` (see :func:`channel_group`). Any
other layer is used alone (one gray or one RGB image per page).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import numpy as np


def unwrapped(obj):
    """The napari object itself behind a ``PublicOnlyProxy`` (else ``obj``).

    A docked widget is handed a proxy of the viewer, and every object reached through it is
    a proxy again, a new one at each access (``viewer.layers["a"] is viewer.layers["a"]`` is
    False): a layer is tracked by the layer itself, and a widget given to Qt must be the
    widget, not its proxy."""
    return getattr(obj, "__wrapped__", obj)


def label_visible(viewer, image) -> bool:
    """Whether a label layer made for ``image`` shows: with its image, and not in grid mode,
    where napari gives every layer its own cell (a label would sit alone in an empty cell,
    cut off, away from its image)."""
    return bool(image.visible) and not viewer.canvas.grid.enabled


def follow_visibility(viewer, image, companion) -> None:
    """Show and hide ``companion`` (a label layer made for ``image``) with ``image``, and
    hide it in grid mode (:func:`label_visible`)."""
    image = unwrapped(image)
    ref = weakref.ref(unwrapped(companion))
    grid = unwrapped(viewer.canvas.grid)

    def update(*_) -> None:
        layer = ref()
        if layer is not None:
            layer.visible = bool(image.visible) and not grid.enabled

    update()
    image.events.visible.connect(update)
    grid.events.enabled.connect(update)


def image_layers(viewer) -> list:
    """The image layers to classify or annotate (not the heatmaps Explain adds)."""
    from napari.layers import Image

    return [lyr for lyr in viewer.layers if isinstance(lyr, Image) and "heatmap" not in _meta(lyr)]


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

    Layers another reader opened carry no such metadata; :func:`_opened_together` groups
    them by napari's ``layer.source``.
    """
    meta = _meta(layer)
    if layer.rgb:
        return [layer]
    if not meta:
        return _opened_together(viewer, layer)
    if "channel" not in meta:
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


_DEDUPED = re.compile(r" \[\d+\]$")  # napari's suffix for a name already taken: "C0 [1]"


def _opened_together(viewer, layer) -> list:
    """The channel layers that another reader made, with ``layer``, from one opening of a
    file, in layer-list order (a reader's channel order); ``[layer]`` when there are none.

    napari gives every layer of a reader's result ``source.path`` and
    ``source.reader_plugin``, but nothing that tells two openings of one file apart. So the
    group is taken from the run of image layers, consecutive in the layer list, that share
    ``layer``'s path, reader and shape, are not RGB and carry no microclf metadata; the run
    is cut where an opening starts:

    - at each layer whose blending is not additive, when the run has one: napari gives the
      first channel layer of a ``channel_axis`` result ``translucent_no_depth`` and the
      others ``additive`` (and a reader's separate layers ``translucent_no_depth`` each);
    - else (a reader that made every layer additive) at a layer whose name, less napari's
      `` [n]`` suffix, is already in the group: the second opening's ``C0 [1]`` after the
      first's ``C0``.

    When in doubt it cuts: a channel left out shows in the widgets' labels, channels of two
    openings mixed would not. Moving a channel layer away from the others leaves it alone;
    making the first channel layer of the second opening additive would join two openings.
    """
    # by identity: the layers themselves, not a docked widget's proxies of them (a new one
    # at each access, never ``is`` another)
    layer = unwrapped(layer)
    path, plugin = layer.source.path, layer.source.reader_plugin
    layers = [unwrapped(lyr) for lyr in image_layers(viewer)]
    if not path or not any(lyr is layer for lyr in layers):
        return [layer]

    def fits(other) -> bool:
        return other is layer or (
            not _meta(other)
            and not other.rgb
            and other.source.path == path
            and other.source.reader_plugin == plugin
            and _data(other).shape == _data(layer).shape
        )

    at = next(i for i, lyr in enumerate(layers) if lyr is layer)
    start, stop = at, at + 1
    while start > 0 and fits(layers[start - 1]):
        start -= 1
    while stop < len(layers) and fits(layers[stop]):
        stop += 1
    run = layers[start:stop]
    by_blending = any(lyr.blending != "additive" for lyr in run)
    group: list = []
    for lyr in run:
        if by_blending:
            starts = lyr.blending != "additive"
        else:
            starts = _DEDUPED.sub("", lyr.name) in {_DEDUPED.sub("", g.name) for g in group}
        if group and starts:
            if any(g is layer for g in group):
                break
            group = []  # an earlier opening ends here
        group.append(lyr)
    return group


def page_in_view(viewer, layer) -> tuple[int, ...]:
    """Index of the page the dims sliders show for ``layer`` (``()`` for a 2D image)."""
    shape = lead_shape(layer)
    if not shape:
        return ()
    coords = layer.world_to_data(viewer.dims.point)[: len(shape)]
    return tuple(
        int(np.clip(round(float(c)), 0, s - 1)) for c, s in zip(coords, shape, strict=True)
    )


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
    return PageSource(
        group[0].name,
        source_of(group[0]),
        tuple(_data(lyr) for lyr in group),
        lead_shape(group[0]),
        origins,
    )


def rename_companion(viewer, old: str, new: str, image: str) -> None:
    """Rename layer ``old``, made for an image layer (its labels, its heatmap), to ``new`` and
    record the image's new name ``image`` in its metadata; nothing when there is no ``old``."""
    if old in viewer.layers:
        layer = viewer.layers[old]
        layer.metadata["microclf"] = {**layer.metadata.get("microclf", {}), "image_layer": image}
        layer.name = new


def user_labels(viewer) -> list:
    """The user's Labels layers (not those the widgets made: annotated objects, predicted
    classes, which carry microclf metadata)."""
    from napari.layers import Labels

    return [lyr for lyr in viewer.layers if isinstance(lyr, Labels) and not _meta(lyr)]


def labels_for(viewer, image) -> list:
    """The user's Labels layers that can segment image layer ``image``: shaped like its
    pages, one label page per image page or one for every page."""
    if image is None:
        return []
    lead = lead_shape(image)
    page = tuple(_data(image).shape[len(lead) : len(lead) + 2])
    return [lyr for lyr in user_labels(viewer) if tuple(lyr.data.shape) in (lead + page, page)]
