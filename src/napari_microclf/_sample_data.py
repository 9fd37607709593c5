"""napari sample data "Microscopy classes": one image per class and a mixed-class stack."""

from __future__ import annotations

import numpy as np

from .core.sample import CLASSES, make_image, make_sample_stack


def microscopy_classes() -> list[tuple]:
    """Three 96 px images (one per class) and a 12-page stack whose pages mix the classes.

    The stack's true classes are in its layer ``metadata["true_classes"]`` (page order).
    """
    rng = np.random.default_rng(7)
    layers = []
    for name in CLASSES:
        image = make_image(name, rng, 96)
        layers.append(
            (
                image,
                {
                    "name": f"{name} (example)",
                    "contrast_limits": _limits(image),
                    "metadata": {"true_classes": [name]},
                },
                "image",
            )
        )
    stack, labels = make_sample_stack(n_pages=12, size=96, seed=1)
    layers.append(
        (
            stack,
            {
                "name": "mixed stack",
                "contrast_limits": _limits(stack),
                "metadata": {"true_classes": labels},
            },
            "image",
        )
    )
    return layers


def _limits(image: np.ndarray) -> list[float]:
    """Display range from percentiles: the camera offset black, the cells bright."""
    lo, hi = np.percentile(image, [1, 99.8])
    return [float(lo), float(hi)]
