"""Objects classified one by one: microclf's predict_objects against a plain Keras pipeline
on the same field, in the same run; objects/s and peak memory.

    python bench/objects_speed.py                       # 1,000 objects of one 2048 x 2048 field
    python bench/objects_speed.py --pages 100 --no-plain   # 100,000 objects, a 100-page stack

The field: 16 tiles of the synthetic labelled cells (core/sample.make_field), 512 x 512 each,
~64 cells a tile: ~1,000 objects on a 2048 x 2048 page. A stack of ``--pages`` such pages is
written to a TIFF and read page by page. The model: ImageNet EfficientNet-Lite0 with a
3-class head at ``--image-size`` (what it predicts does not change its speed). microclf:
``predict_objects`` (crops cut page by page and batch by batch, the default engine). Plain
Keras, as a user would write it: ``skimage.measure.regionprops`` for the boxes, every crop
cut and preprocessed into one array, ``model.predict``. Peak memory is the process's maximum
resident size after each side (Linux ru_maxrss; the plain side runs second, so its number
includes microclf's peak if that was higher).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def _field(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from napari_microclf.core.sample import make_field

    img = np.zeros((2048, 2048), np.uint16)
    lab = np.zeros((2048, 2048), np.int32)
    n = 0
    for i in range(4):
        for j in range(4):
            im, lb, _ = make_field(512, 64, seed=seed * 16 + i * 4 + j)
            lb = lb.astype(np.int32)
            lb[lb > 0] += n
            n = max(n, int(lb.max()))
            img[i * 512 : (i + 1) * 512, j * 512 : (j + 1) * 512] = im
            lab[i * 512 : (i + 1) * 512, j * 512 : (j + 1) * 512] = lb
    return img, lab


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain(model, img, lab, spec, crop) -> tuple[int, float]:
    """regionprops, every crop into one array, model.predict: (objects, seconds)."""
    from skimage.measure import regionprops

    from napari_microclf.core.images import preprocess
    from napari_microclf.core.objects import ObjectInfo, cut_crop

    t0 = time.perf_counter()
    xs = []
    for r in regionprops(lab):
        info = ObjectInfo(r.label, 0, tuple(r.bbox), tuple(r.centroid), int(r.area), False)
        xs.append(preprocess(cut_crop(img, lab, info, crop)[..., None], spec))
    probs = model.predict(np.stack(xs), batch_size=32, verbose=0)
    return len(probs), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=1, help="2048 x 2048 pages, ~1,000 objects each")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--no-plain", action="store_true", help="microclf only (for large stacks)")
    ap.add_argument("--work", default="/tmp/microclf-bench-objects")
    args = ap.parse_args()

    import tifffile

    from napari_microclf.core.bundle import write_bundle
    from napari_microclf.core.images import PreprocessSpec
    from napari_microclf.core.model import LITE0, build_classifier
    from napari_microclf.core.objects import CropSpec
    from napari_microclf.core.predict_objects import predict_objects
    from napari_microclf.core.predictor import Predictor

    print(machine())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    img, lab = _field()
    stack, labels = work / f"field-{args.pages}.tif", work / f"field-{args.pages}_labels.tif"
    if not stack.exists():
        with tifffile.TiffWriter(stack) as ti, tifffile.TiffWriter(labels) as tl:
            for p in range(args.pages):
                im, lb = (img, lab) if p == 0 else _field(p)
                ti.write(im, contiguous=True)
                tl.write(lb, contiguous=True)
    spec, crop = PreprocessSpec(args.image_size), CropSpec()
    model = build_classifier(3, args.image_size, "auto", backbone=LITE0, warn=False)
    meta = {"class_names": ["a", "b", "c"], "preprocessing": spec.to_dict()}
    bundle = write_bundle(
        work / f"model-{args.image_size}", model, {**meta, "objects": {"crop": crop.to_dict()}}
    )
    predictor = Predictor(bundle, engine=args.engine)
    list(predict_objects(predictor, img[:256, :256], lab[:256, :256]))  # load, convert, trace
    before = _peak_mb()
    t0 = time.perf_counter()
    n = sum(1 for _ in predict_objects(predictor, stack, labels))
    ours = time.perf_counter() - t0
    print(
        f"microclf predict_objects ({predictor.engine}, {args.image_size} px): {n} objects on "
        f"{args.pages} page(s) in {ours:.1f}s = {n / ours:.0f} objects/s; peak memory "
        f"{_peak_mb():.0f} MB (before the run {before:.0f} MB)"
    )
    if args.no_plain:
        return
    model.predict(np.zeros((1, args.image_size, args.image_size, 3), np.float32), verbose=0)
    m, plain = _plain(model, img, lab, spec, crop)
    print(
        f"plain Keras (regionprops, all crops in memory, model.predict): {m} objects in "
        f"{plain:.1f}s = {m / plain:.0f} objects/s; peak memory {_peak_mb():.0f} MB"
    )
    print(f"ratio (plain time / microclf time, one page): {plain / ours * args.pages:.2f}x")


if __name__ == "__main__":
    main()
