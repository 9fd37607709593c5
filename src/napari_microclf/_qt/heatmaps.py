"""Grad-CAM heatmaps on the canvas: where the model looks (``core.explain``).

Predict's Explain runs :func:`explain_layers` in a worker and shows each chosen layer's
heatmaps, page by page, as an image layer ``"<layer> Grad-CAM"`` on the source's pixels
(same scale, units and transforms, :func:`show_heatmap`). The heatmap layer follows its
image's name (:func:`rename_heatmap`) and is left out of the layer lists
(``_layers.image_layers`` skips layers with ``metadata["microclf"]["heatmap"]``).
"""

from __future__ import annotations

import threading

import numpy as np

from ..core.errors import BundleError, one_line
from ..core.images import ImageReadError
from . import _layers
from ._worker import surfaced
from .predictor_cache import get_explainer

ERRORS = (BundleError, ImageReadError, ValueError, OSError)  # said in one line, as Predict's
PREDICTED = "predicted class"  # the class chooser's first entry: each page's own class


def heatmap_name(name: str) -> str:
    """The heatmap layer of image layer ``name``."""
    return f"{name} Grad-CAM"


@surfaced
def explain_layers(
    bundle: str, sources: list, class_name: str | None, stop: threading.Event | None = None
):
    """Worker: yields ``(layer name, Explanation)`` for every page of every source, until
    ``stop`` is set; returns one line for a model or page that cannot be read (else None)."""
    stop = stop or threading.Event()
    try:
        explainer = get_explainer(bundle)
    except ERRORS as exc:
        return str(exc)
    for src in sources:
        if stop.is_set():
            break
        items = ((p, src.page(p)) for p in range(src.n_pages))
        try:
            for e in explainer.explain_pages(items, class_name, stop.is_set):
                yield (src.name, e)
        except ERRORS as exc:
            return f"{src.name}: {one_line(exc)}"
    return None


def show_heatmap(viewer, name: str, data: np.ndarray) -> None:
    """The heatmap layer of image layer ``name``, on its pixels (same transforms): added, or
    its data replaced when it is there already."""
    source = viewer.layers[name]
    hname = heatmap_name(name)
    active = viewer.layers.selection.active
    if hname in viewer.layers:
        viewer.layers[hname].data = data
        return
    viewer.add_image(
        data,
        name=hname,
        colormap="inferno",
        opacity=0.5,
        blending="additive",
        contrast_limits=(0.0, 1.0),
        scale=source.scale,
        units=source.units,
        translate=source.translate,
        rotate=source.rotate,
        shear=source.shear,
        affine=source.affine,
        # in the metadata from the start: the layer lists skip heatmaps when it is added
        metadata={"microclf": {"image_layer": name, "heatmap": "grad-cam"}},
    )
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active  # keep the image active (keys 1-9)


def rename_heatmap(viewer, old: str, new: str) -> None:
    """Image layer ``old`` is now ``new``: its heatmap layer takes the new name."""
    _layers.rename_companion(viewer, heatmap_name(old), heatmap_name(new), new)
