"""The prediction settings, declared once: :class:`PredictOptions`.

Each field's default is the only default of that setting, and its ``metadata["help"]`` its
only description: ``microclf predict`` and ``microclf evaluate`` take their options' defaults
and help from here, the Predict widget its defaults, and the predictor, folder runs and the
cluster workers (which receive the options as they are) fall back to them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .engine import ENGINES, PRECISIONS

TTA_HELP = (
    "test-time augmentation: average each page's probabilities over the page and its "
    "horizontal, vertical and double flips (about 4x the compute)"
)


def _opt(default, help: str, **extra):
    """A setting with its one description (the CLI's help)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class PredictOptions:
    """How pages are classified; the defaults are every entry point's.

    Functions that take ``options`` also keep their keyword arguments (``batch_size=``,
    ``tta=``, ...): a keyword given wins over ``options``, which wins over these defaults
    (:meth:`merged`).

    Examples
    --------
    >>> from napari_microclf.core.predict_options import PredictOptions
    >>> options = PredictOptions(tta=True, threshold=0.6)
    >>> predict_folder("model", "plates/", "plates.csv", options=options)  # doctest: +SKIP
    """

    threshold: float = _opt(
        0.0,
        "confidence below which the class reads 'uncertain' (0); a page unlike the training "
        "images reads 'unfamiliar' whatever its confidence (its unfamiliar score, printed "
        "and in the CSV, is above 1)",
    )
    batch_size: int = _opt(32, "pages per forward pass (32)")
    tta: bool = _opt(False, TTA_HELP)
    engine: str = _opt(
        "auto",
        "what runs the model: auto (OpenVINO when installed, else TensorFlow; "
        "$MICROCLF_ENGINE sets the default), openvino or tensorflow; fp32 on either, the same "
        "probabilities within 1e-4",
        choices=ENGINES,
    )
    precision: str = _opt(
        "f32",
        "faster, approximate modes on OpenVINO: bf16 on CPUs with bf16 instructions "
        "(elsewhere it runs f32), int8 on any CPU (quantized once per model with NNCF, "
        "calibrated on the model's training images). Their probabilities differ from "
        "f32 and the top class can change on borderline pages: docs/performance.md gives "
        "the measured agreement",
        choices=PRECISIONS,
    )

    def merged(self, **given) -> PredictOptions:
        """These options with the settings in ``given`` that are not None."""
        given = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


DEFAULTS = PredictOptions()


def options_of(options: PredictOptions | None = None, **given) -> PredictOptions:
    """``options`` (default :data:`DEFAULTS`) with the keyword arguments that are not None."""
    return (options or DEFAULTS).merged(**given)


def help_of(name: str) -> str:
    """The one description of a PredictOptions setting."""
    return PredictOptions.__dataclass_fields__[name].metadata.get("help", "")
