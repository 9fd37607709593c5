"""Scores that an imbalanced dataset does not fool: balanced accuracy and macro-F1.

Accuracy rewards always answering the largest class (57 % of the images of one class: 0.57
for a model that learned nothing). Balanced accuracy is the mean of the per-class recalls and
macro-F1 the mean of the per-class F1 scores; both give every class the same say. They are
computed from a confusion matrix (rows: true class, columns: predicted), the same way for the
test report (:func:`balanced_accuracy`, :func:`macro_f1`) and, inside Keras, for every epoch
(:func:`epoch_metrics`, whose values appear in the epoch lines as ``balanced_accuracy`` and
``macro_f1``, with ``val_`` for the validation set).
"""

from __future__ import annotations

import numpy as np


def balanced_accuracy(cm) -> float | None:
    """The mean recall over the classes that have images (None when none has)."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float((np.diag(cm)[present] / support[present]).mean())


def macro_f1(cm) -> float | None:
    """The mean F1 over the classes that are true or predicted at least once (None: neither)."""
    cm = np.asarray(cm, dtype=np.float64)
    seen = cm.sum(axis=1) + cm.sum(axis=0)
    present = seen > 0
    if not present.any():
        return None
    return float((2 * np.diag(cm)[present] / seen[present]).mean())


def epoch_metrics(n_classes: int) -> list:
    """Keras metrics ``balanced_accuracy`` and ``macro_f1`` over an epoch's batches (one
    confusion matrix accumulated per epoch; class weights do not count in them)."""
    import keras
    from keras import ops

    class _FromConfusion(keras.metrics.Metric):
        def __init__(self, name: str, n_classes: int, **kwargs):
            super().__init__(name=name, **kwargs)
            self.n_classes = n_classes
            self.cm = self.add_variable(
                shape=(n_classes, n_classes), initializer="zeros", name="cm", dtype="float32"
            )

        def update_state(self, y_true, y_pred, sample_weight=None):
            t = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.n_classes)
            p = ops.one_hot(ops.argmax(y_pred, axis=-1), self.n_classes)
            self.cm.assign_add(ops.matmul(ops.transpose(t), p))

        def reset_state(self):
            self.cm.assign(ops.zeros((self.n_classes, self.n_classes)))

        def get_config(self):
            return {"name": self.name, "n_classes": self.n_classes}

    class BalancedAccuracy(_FromConfusion):
        def result(self):
            support = ops.sum(self.cm, axis=1)
            present = ops.cast(support > 0, "float32")
            recall = ops.diagonal(self.cm) / ops.maximum(support, 1.0)
            return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    class MacroF1(_FromConfusion):
        def result(self):
            seen = ops.sum(self.cm, axis=1) + ops.sum(self.cm, axis=0)
            present = ops.cast(seen > 0, "float32")
            f1 = 2.0 * ops.diagonal(self.cm) / ops.maximum(seen, 1.0)
            return ops.sum(f1 * present) / ops.maximum(ops.sum(present), 1.0)

    return [BalancedAccuracy("balanced_accuracy", n_classes), MacroF1("macro_f1", n_classes)]
