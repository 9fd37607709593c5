"""The Train widget's settings: a form made from :class:`core.train.TrainConfig`'s fields.

Each row of the form is a TrainConfig field (:data:`FORM`): the field's default is the
widget's value, its type picks the widget (a check box for on/off, a spin box for a number,
a text box for free text) and its one description (``help_of``) is the tip. A row says only
how the field is shown: its label, the range and step of a number, and for a list its
choices (the words for the values a field declares in its ``choices``, or the values the
form offers for a free-form field such as ``weights``). Two rows are the form's own, not
settings (:data:`COMPANIONS`): the weights file under "weights: from a file" and the MIN,MAX
range under "intensity: fixed"; :func:`form_settings` folds them back into ``weights`` and
``intensity``.
"""

from __future__ import annotations

from dataclasses import dataclass

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    SpinBox,
)

from ..core import settings as env
from ..core.model import B0, LITE0, imagenet_cached, resolve_weights
from ..core.train import Preset
from ..core.train_config import TrainConfig, help_of

BACKBONE_NAMES = {B0: "EfficientNet-B0", LITE0: "EfficientNet-Lite0"}
CLASS_WEIGHT_NAMES = {
    "sqrt": "sqrt (rare classes count more)",
    "balanced": "balanced (the guide's)",
    "none": "none",
}
ENGINE_NAMES = {
    "auto": "auto (OpenVINO if installed)",
    "openvino": "OpenVINO",
    "tensorflow": "TensorFlow",
}


@dataclass(frozen=True)
class Row:
    """How the form shows the TrainConfig field ``field``.

    ``label``: the row's words (a check box's text; default: the field's name); ``min``,
    ``max``, ``step``: a number's range; ``choices``: ``[(words, value), ...]`` for a field
    whose values the form offers from a list, or ``{value: words}`` for one that declares its
    ``choices`` itself."""

    field: str
    label: str | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: list | dict | None = None

    def widget(self):
        """The magicgui widget of this row, holding the field's default."""
        spec = TrainConfig.__dataclass_fields__[self.field]
        value = spec.default
        declared = spec.metadata.get("choices")
        kwargs: dict = {"name": self.field}
        if self.choices is not None:
            choices = [(self.choices[v], v) for v in declared] if declared else list(self.choices)
            kind, kwargs["choices"] = ComboBox, choices
        elif isinstance(value, bool):
            kind = CheckBox
        elif isinstance(value, int):
            kind = SpinBox
        elif isinstance(value, float):
            kind = FloatSpinBox
        else:  # free text: empty for "not set"
            kind, value = LineEdit, "" if value is None else value
        if self.label is not None:
            kwargs["text" if kind is CheckBox else "label"] = self.label
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kind(value=value, **kwargs)


# The form, top to bottom: the usual settings, then (under "Advanced settings") the rest
FORM = (
    # the model and where it starts from
    Row("backbone", choices=BACKBONE_NAMES),
    Row(
        "weights",
        choices=[
            ("auto (ImageNet, offline fallback)", "auto"),
            ("ImageNet (pretrained)", "imagenet"),
            ("from a file", "file"),
            ("none (random start)", "none"),
        ],
    ),
    Row(
        "fine_tune",
        "fine-tuning",
        choices=[
            ("frozen base (train the head)", 0),
            *[(f"top {n} of 7 stages", n) for n in range(1, 8)],
            ("all layers", "all"),
        ],
    ),
    Row("head_epochs", "head-only epochs", min=0, max=1000),
    Row("fine_tune_epochs", "fine-tuning epochs", min=1, max=1000),
    Row("fine_tune_lr_factor", "fine-tuning rate factor", min=0.001, max=1, step=0.05),
    Row(
        "fine_tune_schedule",
        "fine-tuning schedule",
        choices={"cosine": "warm-up and cosine (AdamW)", "plateau": "cut on plateaus (guide)"},
    ),
    Row("label_smoothing", "label smoothing", min=0, max=0.5, step=0.05),
    Row("time_budget", "time budget (e.g. 30m)"),
    # the training run
    Row("epochs", min=1, max=1000),
    Row("batch_size", "batch size", min=1, max=1024),
    Row("learning_rate", "learning rate", min=1e-6, max=0.1, step=1e-5),
    Row("dropout", min=0, max=0.9, step=0.05),
    Row("augment", "augmentation"),
    Row("augment_strength", "augmentation strength", min=0, max=0.5, step=0.01),
    Row("class_weights", "class weights", choices=CLASS_WEIGHT_NAMES),
    Row("early_stopping", "early stopping"),
    # the images
    Row("image_size", "image size (px)", min=32, max=1024, step=16),
    Row(
        "intensity",
        choices=[
            ("auto (8-bit kept, else percentile)", "auto"),
            ("percentile (per channel)", "percentile"),
            ("fixed (keep brightness)", "fixed"),
        ],
    ),
    # the split
    Row("val_split", "validation split", min=0, max=0.5, step=0.05),
    Row("test_split", "test split", min=0, max=0.5, step=0.05),
    Row("group_by", "group by"),
    Row("seed", min=0, max=2**31 - 1),
    # speed
    Row("cache", "cache backbone features (fast, frozen base)"),
    Row("views", "augmented views", min=0, max=32),
    Row(
        "epoch_views",
        "views per epoch",
        choices={"all": "all (every cached view)", "one": "one at random (guide)"},
    ),
    Row("engine", "inference engine", choices=ENGINE_NAMES),
)
# The settings most trainings change, shown first; the others are under "Advanced settings"
USUAL = (
    "backbone",
    "weights",
    "fine_tune",
    "epochs",
    "batch_size",
    "learning_rate",
    "augment",
    "image_size",
    "val_split",
    "test_split",
)
FORM = tuple(r for r in FORM if r.field in USUAL) + tuple(r for r in FORM if r.field not in USUAL)
ADVANCED = "advanced"  # the check box that shows the advanced settings

# The form's own rows, each shown under the setting it completes (hidden until it applies)
COMPANIONS = {
    "weights": lambda: FileEdit(
        name="weights_file", label="weights file", mode="r", filter="*.h5", visible=False
    ),
    "intensity": lambda: LineEdit(
        name="intensity_range", label="fixed range", value="", visible=False
    ),
}

# Tips of the form's own rows (the fields' tips come from their one description, ``help_of``)
WIDGET_TIPS = {
    ADVANCED: "Show the settings most trainings leave at their defaults: fine-tuning's second "
    "phase, regularisation, intensity, the split's grouping and seed, speed.",
    "weights_file": "An EfficientNet-B0 or -Lite0 weights file without its top (.h5), of the "
    "backbone chosen above.",
    "intensity_range": "With fixed intensity: the MIN,MAX values shown as black and white, "
    "e.g. 0,4095 for a 12-bit camera; empty: the image type's full range.",
}


def tip(name: str) -> str:
    """A form widget's tooltip: the setting's one description (``TrainConfig`` metadata)."""
    if name in WIDGET_TIPS:
        return WIDGET_TIPS[name]
    text = help_of(name)
    return text[:1].upper() + text[1:] + "."


def settings_form() -> Container:
    """The form of :data:`FORM` (and its companions) at the training guide's defaults, each
    widget with its tip; a companion shows when its setting asks for it."""
    widgets = []
    for row in FORM:
        if row.field not in USUAL and not any(w.name == ADVANCED for w in widgets):
            widgets.append(CheckBox(name=ADVANCED, text="Advanced settings", value=False))
        widgets.append(row.widget())
        if row.field in COMPANIONS:
            widgets.append(COMPANIONS[row.field]())
    form = Container(widgets=widgets, labels=True)
    for w in form:
        w.tooltip = tip(w.name)
    advanced = list(form[form.index(getattr(form, ADVANCED)) + 1 :])

    def shown(w) -> bool:  # a companion shows only when its setting asks for it
        if w.name == "weights_file":
            return form.weights.value == "file"
        if w.name == "intensity_range":
            return form.intensity.value == "fixed"
        return True

    def show_advanced(on: bool) -> None:
        for w in advanced:
            w.visible = on and shown(w)

    getattr(form, ADVANCED).changed.connect(show_advanced)
    show_advanced(False)
    form.intensity_range.native.setPlaceholderText("MIN,MAX (empty: full range)")
    form.group_by.native.setPlaceholderText("empty: by source file")
    form.weights.changed.connect(lambda v: setattr(form.weights_file, "visible", v == "file"))
    form.intensity.changed.connect(
        lambda v: setattr(form.intensity_range, "visible", v == "fixed" and form[ADVANCED].value)
    )
    form.augment.changed.connect(lambda v: setattr(form.augment_strength, "enabled", v))
    return form


def form_settings(form: Container) -> dict:
    """The form's TrainConfig fields and values; the companions folded in (a weights file,
    ``intensity="fixed:MIN,MAX"``), an empty group-by pattern None."""
    values = {row.field: getattr(form, row.field).value for row in FORM}
    if values["weights"] == "file":
        values["weights"] = str(form.weights_file.value)
    if values["intensity"] == "fixed" and form.intensity_range.value.strip():
        values["intensity"] = f"fixed:{form.intensity_range.value.strip()}"
    values["group_by"] = values["group_by"].strip() or None
    values["time_budget"] = values["time_budget"].strip() or None
    return values


def preset_text(form: Container, preset: Preset) -> str:
    """Preset.text in the form's words: 'batch size 8, fine-tuning frozen base ...'."""
    parts = []
    for name in preset.settings:
        w = getattr(form, name)
        if isinstance(w, CheckBox):
            parts.append(f"{w.text} {'on' if w.value else 'off'}")
        elif isinstance(w, ComboBox):
            parts.append(f"{w.label} {w.current_choice}")
        elif isinstance(w.value, str):
            parts.append(f"{w.label} {w.value}")
        else:
            parts.append(f"{w.label} {w.value:g}")
    return (
        f"Suggested settings for a {preset.row} ({preset.reason}): "
        f"{', '.join(parts)}. Every value can still be changed."
    )


def backbone_choices(backbone: str, weights: str) -> list[tuple[str, str]]:
    """The backbone list's words, the chosen one saying which backbone will be used when
    ``weights="auto"`` takes another (no EfficientNet-B0 weights on this computer)."""
    words = dict(BACKBONE_NAMES)
    if weights == "auto":
        used = resolve_weights(backbone, weights, allow_download=False).backbone
        if used != backbone:
            how = "uses" if env.offline() else "uses, unless B0's weights download,"
            words[backbone] += f" ({how} {BACKBONE_NAMES[used]}: no B0 weights here)"
    return [(text, value) for value, text in words.items()]


def weights_note(backbone: str, weights: str, fine_tune=0) -> tuple[str, str]:
    """One line saying what the model will start from on this computer, and its level.

    Uses ``resolve_weights(..., allow_download=False)``: nothing is downloaded or built.
    """
    if weights == "file":
        return (
            f"Pretrained start: the weights file chosen below (for {BACKBONE_NAMES[backbone]}).",
            "info",
        )
    if weights == "none":
        text = (
            "No pretrained start: the network learns from random weights, which needs far "
            "more images"
        )
        return (
            text
            + (
                ", and a frozen base cannot learn: choose fine-tuning all layers."
                if fine_tune == 0
                else "."
            ),
            "warning",
        )
    resolved = resolve_weights(backbone, weights, allow_download=False)
    if resolved.weights is None:  # auto found no pretrained weights at all
        return resolved.note or "No pretrained weights on this computer.", "warning"
    name = BACKBONE_NAMES[resolved.backbone]
    offline = env.offline()
    if resolved.backbone == B0 and imagenet_cached():
        return f"Pretrained start: ImageNet {name} (from the Keras cache).", "info"
    if resolved.backbone == B0:  # weights="imagenet", not in the cache
        if offline:
            return (
                f"No ImageNet {name} weights in the Keras cache and downloads are off "
                f"(${env.OFFLINE.name}): choose auto.",
                "warning",
            )
        return (
            f"Pretrained start: ImageNet {name}, downloaded at the first training (not in "
            "the Keras cache; offline, choose auto).",
            "warning",
        )
    if backbone == LITE0:
        return f"Pretrained start: ImageNet {name} (installed, no network needed).", "info"
    return (
        f"Pretrained start: ImageNet {name} (no EfficientNet-B0 weights in the Keras cache"
        + ("" if offline else "; downloaded and used instead if online")
        + ").",
        "info",
    )
