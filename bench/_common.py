"""Shared set-up for the benchmarks: machine description, data, weights, timing of the floor."""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), "
        f"{'GPU: ' + ', '.join(g.name for g in gpus) if gpus else 'no GPU'}, "
        f"TensorFlow {tf.__version__}"
    )


def sample_dataset(root: Path, n_per_class: int, size: int = 128, seed: int = 0) -> Path:
    """The synthetic sample data, made once and reused between runs."""
    from napari_microclf.core.sample import make_sample_dataset

    data = root / f"sample-{n_per_class}x3-{size}px"
    if not (data / "round").is_dir() or len(list((data / "round").iterdir())) < n_per_class:
        make_sample_dataset(data, n_per_class=n_per_class, size=size, seed=seed)
    return data


def clear_cache(data: Path) -> None:
    from napari_microclf.core.features import CACHE_DIR

    shutil.rmtree(Path(data) / CACHE_DIR, ignore_errors=True)


def time_backbone(n_images: int, image_size: int, weights, batch_size: int, seed: int = 0) -> float:
    """Seconds for the frozen backbone alone to run over ``n_images`` already in memory."""
    import warnings

    from napari_microclf.core.features import FeatureExtractor
    from napari_microclf.core.model import build_classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_classifier(2, image_size, weights, augment=False, seed=seed)
    extractor = FeatureExtractor(model, seed, batch_size=batch_size)
    batch = (
        np.random.default_rng(0)
        .uniform(0, 255, (batch_size, image_size, image_size, 3))
        .astype(np.float32)
    )
    extractor(batch)  # trace once, outside the timing
    t0 = time.perf_counter()
    done = 0
    while done < n_images:
        n = min(batch_size, n_images - done)
        extractor(batch[:n])
        done += n
    return time.perf_counter() - t0


def add_weights_argument(parser) -> None:
    parser.add_argument(
        "--weights",
        default="sample-pretrained",
        help="'sample-pretrained' (a base trained here from scratch on other "
        "sample data, the default), 'none' (random base: same speed, "
        "nothing learned), 'imagenet', or an .h5 file of base weights",
    )


def pretrained_weights(work: Path, seed: int = 7) -> str:
    """EfficientNetB0 base weights trained here from scratch on separate sample data.

    ImageNet weights cannot be downloaded on the benchmark machine; a base that has learned
    something makes the validation accuracies meaningful (a random frozen base learns
    nothing). Speed does not depend on the weights' values.
    """
    from napari_microclf.core.bundle import load_bundle
    from napari_microclf.core.sample import make_sample_dataset
    from napari_microclf.core.train import TrainConfig, train

    path = work / "sample-pretrained-base.weights.h5"
    if not path.exists():
        data = make_sample_dataset(work / "pretrain-data", n_per_class=100, size=96, seed=seed)
        result = train(
            TrainConfig(
                str(data),
                str(work / "pretrain-model"),
                epochs=20,
                batch_size=16,
                learning_rate=1e-3,
                image_size=64,
                weights=None,
                fine_tune="all",
                augment=False,
                early_stopping=False,
                seed=seed,
            )
        )
        print(
            f"(pretrained a base from scratch on separate sample data: test accuracy "
            f"{result.report['accuracy']:.2f})",
            flush=True,
        )
        load_bundle(result.bundle).model.get_layer("efficientnetb0").save_weights(path)
    return str(path)


def resolve_weights(value: str, work: Path):
    return pretrained_weights(work) if value == "sample-pretrained" else value
