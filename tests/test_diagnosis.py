"""The diagnosis in words (core/report.py): the curves read as the training guide teaches,
at the epoch whose weights the model kept."""

from __future__ import annotations

import numpy as np

from napari_microclf.core.report import classification_report, diagnose


def _names(findings):
    return [f["finding"] for f in findings]


def test_the_kept_epoch_is_early_stoppings_not_the_lowest_loss():
    """A loss lower by less than early stopping's min_delta does not move the kept epoch:
    the words name the epoch whose weights the model has."""
    history = {
        "accuracy": [0.6, 0.9, 1.0, 1.0],
        "val_accuracy": [0.6, 0.96, 0.97, 0.97],
        "val_loss": [0.5, 0.1, 0.05, 0.04995],
    }
    assert "kept epoch 4" in diagnose(history)[0]["evidence"]
    good = diagnose(history, kept=3)[0]
    assert good["finding"] == "Good training run" and "kept epoch 3" in good["evidence"]


def test_overfitting_is_read_at_the_kept_epoch():
    history = {
        "accuracy": [0.7, 0.9, 1.0, 1.0, 1.0],
        "val_accuracy": [0.65, 0.8, 0.7, 0.7, 0.7],
        "val_loss": [0.8, 0.5, 0.7, 0.9, 1.0],
    }
    finding = diagnose(history)[0]
    assert finding["finding"] == "Overfitting" and "kept epoch 2" in finding["evidence"]
    assert "then rising" in finding["evidence"]


def test_fine_tunings_smoothed_loss_is_not_compared_with_the_heads():
    """Phase 2's label-smoothed validation loss sits higher than the head's: the kept epoch
    is the last phase's best, not phase 1's lower number."""
    history = {
        "phase": [1, 1, 2, 2],
        "accuracy": [0.9, 0.95, 0.97, 0.99],
        "val_accuracy": [0.9, 0.96, 0.965, 0.97],
        "val_loss": [0.2, 0.15, 0.4, 0.35],
    }
    assert "kept epoch 4" in diagnose(history)[0]["evidence"]


def test_rare_classes_missed_when_accuracy_rides_on_the_large_class():
    y = np.array([0] * 18 + [1] * 2)
    probs = np.zeros((20, 2))
    probs[:, 0] = 1.0  # always the large class
    report = classification_report(y, probs, ["common", "rare"])
    assert report["accuracy"] == 0.9 and report["balanced_accuracy"] == 0.5
    assert "Rare classes missed" in _names(diagnose({}, report))
