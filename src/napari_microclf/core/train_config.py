"""The training settings, declared once: :class:`TrainConfig` and each setting's one help.

Each field's ``metadata["help"]`` is its only description: ``microclf train --help``, the
Train widget's form and tips and the settings table of ``report.html`` are made from it
(:func:`help_of`). A config checks itself when it is made, before any image is read. What
the training does with it is :mod:`.train`'s; :mod:`.predict_options` is the same for
prediction.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .device import parse_devices
from .engine import check_engine
from .features import DEFAULT_VIEWS
from .finetune import parse_duration
from .images import PreprocessSpec, parse_intensity

CLASS_WEIGHTS = ("sqrt", "balanced", "none")
SCHEDULES = ("cosine", "plateau")


def _opt(default, help: str, cli: str | None = None, **extra):
    """A setting with its one description: the CLI's help and the widget's tip come from it.

    An on/off setting whose flag turns it off (``cli="--no-augment"``) also has ``off``, the
    help of that flag."""
    return field(default=default, metadata={"help": help, "cli": cli, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the training guide's.

    Each field's ``metadata["help"]`` is its only description: ``microclf train --help`` and
    the Train widget's tips are made from it.

    Examples
    --------
    >>> from napari_microclf import TrainConfig, train
    >>> result = train(TrainConfig("dataset", out_dir="model", epochs=15))  # doctest: +SKIP
    """

    data_dir: str
    out_dir: str = "microclf-model"
    epochs: int = _opt(
        200,
        "most passes over the training set (200): early stopping ends the training when "
        "the validation loss stops improving, which the head on cached features does in "
        "20-80 epochs of a fraction of a second each (the guide: 15)",
    )
    batch_size: int = _opt(32, "images per step (32; 8-16 for under 100 images per class)")
    learning_rate: float = _opt(
        1e-3,
        "starting learning rate (1e-3, a fresh head's; fine-tuning multiplies it by the "
        "fine-tuning factor), reduced when the validation loss plateaus (the guide: 1e-4)",
    )
    image_size: int = _opt(
        224,
        "model input side in pixels, each image padded (never "
        "cropped) and resized to it (224, what ImageNet weights expect)",
    )
    val_split: float = _opt(
        0.2,
        "validation fraction or percent (0.2), measured after each epoch (val_loss, val_accuracy)",
        parse="fraction",
    )
    test_split: float = _opt(
        0.1,
        "test fraction or percent (0.1), kept apart until the "
        "end: the test accuracy is the true performance",
        parse="fraction",
    )
    augment: bool = _opt(
        True,
        "random flips, rotation, zoom and contrast of the training images",
        cli="--no-augment",
        off="no flips/rotation/zoom/contrast",
    )
    augment_strength: float = _opt(
        0.05, "rotation/zoom/contrast range (0.05 = ±5%%; 0.1-0.2 for larger datasets)"
    )
    dropout: float = _opt(
        0.2,
        "dropout before the last layer (0.2; 0.3-0.4 for very small "
        "datasets, 0.1-0.2 for large ones; a remedy for overfitting)",
    )
    class_weights: str = _opt(
        "sqrt",
        "how much more rarer classes weigh in the loss and in the validation loss: 'sqrt' "
        "(the square root of 'balanced': rare classes are found without giving away "
        "accuracy wholesale), 'balanced' (n / (classes x n_class), the guide's) or 'none'",
        choices=CLASS_WEIGHTS,
    )
    early_stopping: bool = _opt(
        True,
        "stop when the validation loss (weighted by the class weights) has not improved "
        "for 10 epochs and keep the best epoch's weights",
        cli="--no-early-stopping",
        off="always run every epoch (no early stopping)",
    )
    early_stopping_patience: int = _opt(
        10, "epochs without a better validation loss before early stopping ends (10)"
    )
    reduce_lr_patience: int = _opt(
        5, "epochs without a better validation loss before the learning rate is cut 5x (5)"
    )
    reduce_lr_factor: float = 0.2
    min_lr: float = 1e-7
    backbone: str = _opt(
        "efficientnet-b0",
        "efficientnet-b0 (the guide's) or "
        "efficientnet-lite0 (ImageNet weights installed with microclf, no "
        "network needed)",
        choices=("efficientnet-b0", "efficientnet-lite0"),
    )
    weights: str | None = _opt(
        "auto",
        "'auto' (ImageNet B0 if in the Keras cache or "
        "downloadable, else ImageNet Lite0), 'imagenet', a .h5 file, "
        "or 'none'",
    )
    fine_tune: int | str = _opt(
        0,
        "unfreeze the top N of 7 stages, or 'all' (0: frozen "
        "base); a pretrained base first trains its head frozen",
    )
    head_epochs: int = _opt(
        200,
        "fine-tuning, phase 1: most epochs of the head on the frozen base before the top "
        "stages unfreeze (200; early stopping ends it when the head has converged)",
    )
    fine_tune_epochs: int = _opt(
        15, "fine-tuning, phase 2: epochs with the top stages unfrozen (15)"
    )
    fine_tune_lr_factor: float = _opt(
        0.1, "fine-tuning, phase 2: learning rate multiplied by this (0.1)"
    )
    fine_tune_schedule: str = _opt(
        "cosine",
        "fine-tuning, phase 2: 'cosine' (AdamW, the learning rate warmed up for 2 epochs "
        "then decayed to 0 along a cosine, the best epoch kept) or 'plateau' (Adam, cut 5x "
        "when the validation loss plateaus: the guide's)",
        choices=SCHEDULES,
    )
    label_smoothing: float = _opt(
        0.1, "fine-tuning, phase 2: label smoothing of the loss (0.1; 0 for none)"
    )
    weight_decay: float = _opt(0.05, "fine-tuning, phase 2, 'cosine': AdamW's weight decay (0.05)")
    fine_tune_views: int = _opt(
        8,
        "fine-tuning with the cache: views per training image whose frozen stages' "
        "activations are computed once (8: its 8 symmetries of the square, 90-degree "
        "rotations and mirror images, each cropped to 85-100%% of its area, brightness and "
        "contrast ±augment strength)",
    )
    time_budget: str | None = _opt(
        None,
        "fine-tuning: the whole training's time, e.g. 30m or 1h30m; the first fine-tuning "
        "epoch's time sets how many epochs fit (default: no limit)",
    )
    seed: int = _opt(0, "random seed of the split, the augmentation and the head (0)")
    pmin: float = 1.0
    pmax: float = 99.8
    intensity: str = _opt(
        "auto",
        "'auto' (8-bit images keep their 0-255 range, other dtypes are stretched by "
        "percentiles), 'percentile' (1-99.8%% per channel, the guide's), 'fixed' (the "
        "dtype's range) or 'fixed:MIN,MAX' to keep absolute brightness",
        parse="intensity",
    )
    intensity_range: tuple | None = None
    channel_map: tuple | None = _opt(
        None, "channel map to RGB, e.g. '0,1,-' (auto)", cli="--channels", parse="channels"
    )
    resize_mode: str = _opt(
        "pad",
        "pad to square then resize (no cropping), or stretch",
        cli="--resize",
        choices=("pad", "stretch"),
    )
    group_by: str | None = _opt(
        None,
        "regular expression taking an image's group from its "
        "file name, e.g. '^(plate\\d+_well[A-Z]\\d+)'; images of a group "
        "stay in one subset (default: the source file)",
    )
    resplit: bool = _opt(False, "draw a new split.json (the test set changes)")
    # Frozen base: train the head on backbone features computed once (cached in the
    # dataset) for each image and `views` augmented views of it.
    cache: bool = _opt(
        True,
        "frozen base: compute the backbone's features once per image "
        "and view and keep them in the dataset (fast retraining)",
        cli="--no-cache",
        off="frozen base: run the full pipeline every epoch instead of cached backbone features",
    )
    views: int = _opt(
        DEFAULT_VIEWS,
        f"augmented views per training image whose backbone features are cached ({DEFAULT_VIEWS})",
    )
    epoch_views: str = _opt(
        "all",
        "the head on cached features: each epoch sees 'all' the cached views of every "
        "training image (as a logistic regression on them would), or 'one' drawn at random "
        "(the guide's epoch: one augmented view of each image)",
        choices=("all", "one"),
    )
    engine: str = _opt(
        "auto",
        "what runs the frozen backbone's features and the test-set evaluation: 'auto' "
        "(OpenVINO when installed, else TensorFlow), 'openvino' or 'tensorflow'; the "
        "training itself runs on TensorFlow",
        choices=("auto", "openvino", "tensorflow"),
    )
    devices: str = _opt(
        "all",
        "GPUs to train on: 'all' or numbers such as '0,1'; with two or more, each batch "
        "is split across them (MirroredStrategy) at the same learning rate",
    )

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if isinstance(self.class_weights, bool):  # settings of bundles from before 0.9
            object.__setattr__(self, "class_weights", "balanced" if self.class_weights else "none")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(
                f"class weights must be one of {', '.join(CLASS_WEIGHTS)}, got "
                f"{self.class_weights!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        parse_devices(self.devices)  # a bad spelling is said now, not after the images load
        object.__setattr__(self, "engine", check_engine(self.engine))  # frozen dataclass
        if self.views < 0:
            raise ValueError(f"views must be 0 or more, got {self.views}")
        if not 0 <= self.augment_strength <= 0.5:
            raise ValueError(
                f"augmentation strength must be in [0, 0.5], got {self.augment_strength}"
            )
        if self.early_stopping_patience < 1 or self.reduce_lr_patience < 1:
            raise ValueError(
                "patience must be at least 1 epoch, got early stopping "
                f"{self.early_stopping_patience}, learning-rate reduction "
                f"{self.reduce_lr_patience}"
            )
        if self.head_epochs < 0:
            raise ValueError(f"head epochs must be 0 or more, got {self.head_epochs}")
        if self.fine_tune_epochs < 1:
            raise ValueError(f"fine-tuning epochs must be at least 1, got {self.fine_tune_epochs}")
        if not 0 < self.fine_tune_lr_factor <= 1:
            raise ValueError(
                f"fine-tuning learning-rate factor must be in (0, 1], got "
                f"{self.fine_tune_lr_factor}"
            )
        if not 0 <= self.label_smoothing < 1 or self.weight_decay < 0:
            raise ValueError(
                f"label smoothing must be in [0, 1) and weight decay 0 or more, got "
                f"{self.label_smoothing} and {self.weight_decay}"
            )
        if self.fine_tune_views < 1:
            raise ValueError(f"fine-tuning views must be at least 1, got {self.fine_tune_views}")
        parse_duration(self.time_budget)  # a bad spelling is said now
        if ":" in self.intensity or "," in self.intensity:  # "fixed:0,4095" in one string
            mode, rng = parse_intensity(self.intensity)
            object.__setattr__(self, "intensity", mode)
            object.__setattr__(self, "intensity_range", rng)
        if self.intensity_range is not None:
            object.__setattr__(self, "intensity_range", tuple(self.intensity_range))
        if self.group_by:
            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise ValueError(
                    f"group-by pattern {self.group_by!r} is not a valid regular expression ({exc})"
                ) from None
        self.preprocessing  # noqa: B018 - checks the preprocessing settings now

    @property
    def preprocessing(self) -> PreprocessSpec:
        return PreprocessSpec(
            self.image_size,
            self.pmin,
            self.pmax,
            self.channel_map,
            self.resize_mode,
            self.intensity,
            self.intensity_range,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The training guide's recipe (training-guide.md), one option away: ``--preset guide``. The
# defaults above depart from it where a measurement on real data says so (docs/validity.md):
# its learning rate 1e-4 and 15 epochs leave a fresh head far from converged (0.40 accuracy
# on a real 4-class benchmark where a majority guess scores 0.57); see GUIDE_DEPARTURES.
GUIDE = {
    "epochs": 15,
    "learning_rate": 1e-4,
    "class_weights": "balanced",
    "intensity": "percentile",
    "early_stopping_patience": 5,
    "reduce_lr_patience": 3,
    "head_epochs": 5,
    "fine_tune_epochs": 10,
    "fine_tune_schedule": "plateau",
    "label_smoothing": 0.0,
    "epoch_views": "one",
}
# said only when the training fine-tunes
FINE_TUNING = ("head_epochs", "fine_tune_epochs", "fine_tune_schedule", "label_smoothing")

# Why each default differs from the guide, said in the training's log and the README.
GUIDE_DEPARTURES = {
    "epochs": "up to 200 epochs, ended by early stopping when the validation loss stops "
    "improving (the guide: 15, which stops a fresh head long before it converges)",
    "learning_rate": "learning rate 1e-3, a fresh head's (the guide: 1e-4, a fine-tuning "
    "rate; fine-tuning still uses 1e-4)",
    "class_weights": "class weights 'sqrt' (the guide: 'balanced', which gives away "
    "accuracy wholesale on imbalanced sets)",
    "intensity": "intensity 'auto': 8-bit images keep their range (the guide: a percentile "
    "stretch per image, which throws away absolute brightness)",
    "early_stopping_patience": "early-stopping patience 10 (the guide: 5)",
    "fine_tune_schedule": "fine-tuning with AdamW, a 2-epoch warm-up and a cosine decay "
    "(the guide: Adam, cut when the validation loss plateaus)",
    "label_smoothing": "fine-tuning with label smoothing 0.1 (the guide: none)",
    "epoch_views": "each epoch of the head sees every cached view of each training image "
    "(the guide: one augmented view per image and epoch)",
}


def guide_departures(config: TrainConfig) -> list[str]:
    """The settings of ``config`` that depart from the guide because they are our defaults
    (a value the user chose is theirs, not said)."""
    fields = TrainConfig.__dataclass_fields__
    tunes = str(config.fine_tune).strip() not in ("0", "", "none", "None", "False")
    return [
        why
        for name, why in GUIDE_DEPARTURES.items()
        if getattr(config, name) == fields[name].default != GUIDE[name]
        and (tunes or name not in FINE_TUNING)
    ]


def help_of(name: str) -> str:
    """The one description of a TrainConfig setting (CLI help, widget tip)."""
    return TrainConfig.__dataclass_fields__[name].metadata.get("help", "").replace("%%", "%")
