"""napari-microclf: classify microscopy images in napari with EfficientNetB0 transfer learning.

The public API imports neither Qt nor TensorFlow::

    from napari_microclf import TrainConfig, train, predict
    result = train(TrainConfig("dataset", out_dir="model"))
    predict(result.bundle, "stack.tif")
"""

from ._version import __version__
from .core.csv_format import write_csv
from .core.dataset import add_example, class_counts, load_samples
from .core.evaluate import evaluate
from .core.images import PreprocessSpec, open_image, preprocess
from .core.predict import predict
from .core.predictor import Predictor
from .core.train import TrainConfig, train

__all__ = [
    "__version__",
    "PreprocessSpec",
    "Predictor",
    "TrainConfig",
    "add_example",
    "class_counts",
    "evaluate",
    "load_samples",
    "open_image",
    "predict",
    "preprocess",
    "train",
    "write_csv",
]
