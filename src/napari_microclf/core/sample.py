"""Deterministic synthetic fluorescence images in three morphology classes.

- ``round``: interphase nuclei, round with soft texture;
- ``elongated``: rod-like cells, 3-5 times longer than wide, in any orientation;
- ``fragmented``: mitotic / apoptotic cells, clusters of small bright condensed fragments.

Each image is 16-bit with uneven background, blur, Poisson and read noise and a random
exposure (a 12-bit range in a 16-bit container, as cameras often give). The same seed gives
the same pixels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import OutputError
from .files import atomic_write_text

CLASSES = ("elongated", "fragmented", "round")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma)


def _ellipse(yy, xx, cy, cx, ry, rx, angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return np.clip(1.0 - (u * u + v * v), 0.0, None) ** 0.35


def make_image(class_name: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One ``(size, size)`` uint16 image of ``class_name``."""
    if class_name not in CLASSES:
        raise ValueError(f"unknown sample class {class_name!r}; choose from {CLASSES}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    scale = size / 96.0
    n_cells = int(rng.integers(2, 5))
    for _ in range(n_cells):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        bright = rng.uniform(0.6, 1.0)
        if class_name == "round":
            r = rng.uniform(8, 12) * scale
            cell = _ellipse(yy, xx, cy, cx, r * rng.uniform(0.9, 1.1), r, rng.uniform(0, np.pi))
            texture = 1 + 0.15 * _blur(rng.standard_normal((size, size)), 1.5 * scale)
            img += bright * cell * texture
        elif class_name == "elongated":
            w = rng.uniform(3.5, 5) * scale
            cell = _ellipse(yy, xx, cy, cx, w, w * rng.uniform(3.2, 4.5), rng.uniform(0, np.pi))
            img += bright * cell
        else:  # fragmented: condensed chromatin in 6-12 small bright pieces
            for _ in range(int(rng.integers(6, 13))):
                oy, ox = rng.normal(0, 5 * scale, 2)
                r = rng.uniform(1.2, 2.2) * scale
                img += (
                    1.3
                    * bright
                    * _ellipse(
                        yy, xx, cy + oy, cx + ox, r, r * rng.uniform(1, 2), rng.uniform(0, np.pi)
                    )
                )
    img = _blur(img, rng.uniform(0.6, 1.2) * scale)
    # uneven illumination + camera offset
    gy, gx = rng.uniform(-0.3, 0.3, 2)
    background = 0.08 * (1 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5))
    exposure = rng.uniform(600, 3500)  # photons at full brightness
    photons = rng.poisson(np.clip(img + background, 0, None) * exposure).astype(np.float32)
    counts = 100 + photons + rng.normal(0, 6, img.shape)
    return np.clip(counts, 0, 65535).astype(np.uint16)


def make_sample_dataset(
    out: str | Path, n_per_class: int = 40, size: int = 96, seed: int = 0
) -> Path:
    """Write ``out/<class>/sample_XXX.tif`` for each class; returns ``out``."""
    import tifffile

    out = Path(out)
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n_per_class):
        for cls in CLASSES:
            path = out / cls / f"sample_{i:03d}.tif"
            img = make_image(cls, rng, size)
            if not path.exists():  # never overwrite
                tifffile.imwrite(path, img, photometric="minisblack")
    return out


def make_sample_stack(
    n_pages: int = 12, size: int = 96, seed: int = 1
) -> tuple[np.ndarray, list[str]]:
    """A ``(pages, size, size)`` uint16 stack whose pages cycle through the classes (shuffled)."""
    rng = np.random.default_rng(seed)
    labels = [CLASSES[i % len(CLASSES)] for i in range(n_pages)]
    rng.shuffle(labels)
    return np.stack([make_image(c, rng, size) for c in labels]), labels


def write_sample_stack(
    path: str | Path, n_pages: int = 12, size: int = 96, seed: int = 1
) -> tuple[Path, list[str]]:
    """Write the mixed-class stack as a multi-page TIFF (labels in its description)."""
    import tifffile

    path = Path(path)
    stack, labels = make_sample_stack(n_pages, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path, stack, photometric="minisblack", metadata={"axes": "ZYX", "labels": labels}
    )
    return path, labels


# -- a field of labelled cells (objects) -------------------------------------------------------

CELL = 40  # a cell's patch side in a field, pixels


def _cell(class_name: str, rng: np.random.Generator) -> np.ndarray:
    """One cell of ``class_name`` in a ``(CELL, CELL)`` float patch, centred, in [0, ~1.3]."""
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32)
    c = CELL / 2 - 0.5
    bright = rng.uniform(0.6, 1.0)
    if class_name == "round":
        r = rng.uniform(8, 11)
        cell = _ellipse(yy, xx, c, c, r * rng.uniform(0.9, 1.1), r, rng.uniform(0, np.pi))
        return bright * cell * (1 + 0.15 * _blur(rng.standard_normal((CELL, CELL)), 1.5))
    if class_name == "elongated":
        w = rng.uniform(3.5, 4.5)
        return bright * _ellipse(yy, xx, c, c, w, w * rng.uniform(3.2, 4.2), rng.uniform(0, np.pi))
    img = np.zeros((CELL, CELL), np.float32)
    for _ in range(int(rng.integers(6, 13))):
        oy, ox = np.clip(rng.normal(0, 4.5, 2), -10, 10)
        r = rng.uniform(1.2, 2.2)
        img += (
            1.3
            * bright
            * _ellipse(yy, xx, c + oy, c + ox, r, r * rng.uniform(1, 2), rng.uniform(0, np.pi))
        )
    return img


def make_field(
    size: int = 256, n_cells: int = 24, seed: int = 0, classes: tuple[str, ...] = CLASSES
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A fluorescence field of ``n_cells`` cells of ``classes`` (apart from each other, some
    at the border), its label image and each label's class: ``(image uint16, labels uint16,
    {label: class})``. A cell's label is where its own signal is above a tenth of its peak,
    slightly grown (a segmentation's usual outline); fragmented cells are one label."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    signal = np.zeros((size + CELL, size + CELL), np.float32)  # a margin: cells may be cut
    labels = np.zeros(signal.shape, np.uint16)
    truth: dict[int, str] = {}
    centres: list[tuple[float, float]] = []
    for _ in range(n_cells * 50):
        if len(truth) == n_cells:
            break
        cy, cx = rng.uniform(CELL / 2 + 10, size + CELL / 2 - 10, 2)
        if any((cy - y) ** 2 + (cx - x) ** 2 < (CELL * 0.9) ** 2 for y, x in centres):
            continue
        cls = classes[len(truth) % len(classes)]
        patch = _cell(cls, rng)
        y0, x0 = int(cy - CELL / 2), int(cx - CELL / 2)
        mask = ndimage.binary_dilation(patch > 0.1 * patch.max(), iterations=2)
        mask = ndimage.binary_closing(mask, iterations=3)  # fragments: one object
        label = len(truth) + 1
        signal[y0 : y0 + CELL, x0 : x0 + CELL] += patch
        labels[y0 : y0 + CELL, x0 : x0 + CELL][mask] = label
        truth[label] = cls
        centres.append((cy, cx))
    m = CELL // 2
    signal, labels = signal[m : m + size, m : m + size], labels[m : m + size, m : m + size]
    present = set(np.unique(labels)) - {0}
    truth = {k: v for k, v in truth.items() if k in present}
    img = _blur(signal, rng.uniform(0.6, 1.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    gy, gx = rng.uniform(-0.3, 0.3, 2)
    background = 0.08 * (1 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5))
    photons = rng.poisson(np.clip(img + background, 0, None) * rng.uniform(800, 3000))
    counts = 100 + photons.astype(np.float32) + rng.normal(0, 6, img.shape)
    return np.clip(counts, 0, 65535).astype(np.uint16), labels, truth


def write_sample_fields(
    out: str | Path, n_fields: int = 4, size: int = 256, n_cells: int = 24, seed: int = 0
) -> list[dict]:
    """``out/field_XX.tif`` with ``out/field_XX_labels.tif`` and ``out/field_XX_classes.csv``
    (columns ``label,class``: the truth) per field; returns their paths and truth."""
    import tifffile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = []
    for i in range(n_fields):
        image, labels, truth = make_field(size, n_cells, seed + i)
        stem = out / f"field_{i:02d}"
        tifffile.imwrite(f"{stem}.tif", image, photometric="minisblack")
        tifffile.imwrite(f"{stem}_labels.tif", labels, photometric="minisblack")
        table = "label,class\n" + "".join(f"{k},{v}\n" for k, v in sorted(truth.items()))
        atomic_write_text(f"{stem}_classes.csv", table)
        fields.append(
            {
                "image": Path(f"{stem}.tif"),
                "labels": Path(f"{stem}_labels.tif"),
                "table": Path(f"{stem}_classes.csv"),
                "truth": truth,
            }
        )
    return fields


SAMPLE_MARKER = ".microclf-sample.json"  # what made a sample folder (its settings)


def _check_sample_folder(out: Path, settings: dict) -> None:
    """A sample is written into a new or empty folder, or into an earlier sample made with
    the same settings (then nothing changes, but what these settings add: fields of cells);
    never among the user's files (OutputError)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out} is a file; choose a new folder for the sample")
    marker = out / SAMPLE_MARKER
    if marker.is_file():
        try:
            made = json.loads(marker.read_text())
        except (OSError, ValueError):
            made = None
        if isinstance(made, dict) and made.items() <= settings.items():
            return  # the same sample, or one this call adds to (its fields of cells)
        said = ", ".join(f"{k} {v}" for k, v in made.items()) if isinstance(made, dict) else "?"
        raise OutputError(
            f"{out} holds a sample made with other settings ({said}); choose a new folder "
            "or remove that one"
        )
    if any(out.iterdir()) and not _older_sample(out):
        raise OutputError(
            f"{out} already holds files and is not a microclf sample; choose a new or empty "
            "folder (nothing was written)"
        )


def _older_sample(out: Path) -> bool:
    """A sample written before the marker (an earlier ``microclf demo`` folder): its
    dataset holds only the sample's class folders of ``sample_NNN.tif`` files, beside the
    stack. Adding to it mixes synthetic images with synthetic images only."""
    data = out / "dataset"
    if not (out / "mixed_stack.tif").is_file() or not data.is_dir():
        return False
    for folder in data.iterdir():
        if folder.name.startswith("."):
            continue  # the feature cache
        if folder.is_file() and folder.name == "split.json":
            continue
        if folder.name not in CLASSES or not folder.is_dir():
            return False
        if any(not re.fullmatch(r"sample_\d{3}\.tif", f.name) for f in folder.iterdir()):
            return False
    return True


def write_sample(
    out: str | Path,
    n_per_class: int = 40,
    size: int = 96,
    seed: int = 0,
    stack_pages: int = 12,
    fields: int = 0,
) -> dict:
    """The dataset in ``out/dataset``, the stack in ``out/mixed_stack.tif`` and, with
    ``fields``, that many fields of labelled cells in ``out/cells/`` (each image with its
    ``_labels.tif`` and its ``_classes.csv``: :func:`write_sample_fields`).

    ``out`` is new or empty, or an earlier sample with the same settings (recorded in
    ``out/.microclf-sample.json``; a rerun keeps it as it is); a folder of other files is
    refused with OutputError, so no synthetic image ever lands among real ones."""
    import tifffile

    out = Path(out)
    settings = {"n_per_class": n_per_class, "size": size, "seed": seed, "stack_pages": stack_pages}
    if fields:
        settings["fields"] = fields
    _check_sample_folder(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SAMPLE_MARKER, json.dumps(settings))
    data = make_sample_dataset(out / "dataset", n_per_class, size, seed)
    stack_path = out / "mixed_stack.tif"
    if stack_path.exists():  # the same settings made it: its pages are in its description
        with tifffile.TiffFile(stack_path) as tif:
            labels = list(tif.shaped_metadata[0]["labels"])
    else:
        stack_path, labels = write_sample_stack(stack_path, stack_pages, size, seed + 1)
    cells = write_sample_fields(out / "cells", fields, seed=seed) if fields else []
    return {"dataset": data, "stack": stack_path, "stack_labels": labels, "fields": cells}
