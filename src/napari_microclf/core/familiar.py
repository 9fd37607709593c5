"""Unfamiliar images: how far a page lies from the training data in the model's feature space.

A classifier gives every image one of its classes, often with a confidence near 1, even a
tomogram or a photograph it has never seen anything like. Each bundle therefore keeps a
compact description of its training images in the space of the pooled backbone features
(the ``avg_pool`` output the head reads, 1280 numbers per image), each scaled to length 1:

- the mean feature vector of each class, and
- one covariance shared by the classes (the within-class scatter), shrunk towards a multiple
  of the identity by the Ledoit-Wolf formula, because a few hundred images cannot estimate
  1280 x 1280 numbers. Only its ``k`` largest principal directions are stored, with their
  variances, plus one variance for the rest (probabilistic PCA), so the file stays small.

A page's distance is its smallest Mahalanobis distance to a class mean (Lee et al. 2018, "A
simple unified framework for detecting out-of-distribution samples"). Mahalanobis rather
than k nearest neighbours: the file's size does not grow with the dataset, the distance
needs no search, and the shared covariance discounts the directions in which the training
images themselves vary (illumination, exposure) while anything outside them counts fully.
The features are scaled to unit length first (as KNN-OOD, Sun et al. 2022, found essential):
pure noise has feature *magnitudes* like an empty background field, but not its direction.
On the sample data (Lite0, 64 px) unit length lifts noise from 0.8-1.3 to 2.3-2.5 times the
threshold, while the test images stay below 0.8 and scikit-image's photographs at 1.8-2.3.

The threshold is the 99th percentile of the distances of the *validation* images, which
the description has not seen: about 1% of images like the training data lie beyond it. With
fewer than :data:`MIN_CALIBRATION` validation images that percentile is only the largest
one, so out-of-fold distances of the training images (5 folds, each scored by a
description fitted without it) are added to the calibration set; ``meta["calibration"]``
says which was used. A page's ``unfamiliar_score`` is its distance divided by the
threshold: above 1 means unfamiliar.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import FeatureExtractor
from .model import FEATURE_LAYER
from .pipeline import CHUNK_BATCHES

FAMILIARITY_FILE = "familiarity.npz"
METHOD = "mahalanobis"  # min over classes, shared Ledoit-Wolf covariance, PCA-truncated
NORMALIZE = "l2"  # features scaled to unit length before anything else
FORMAT_VERSION = 1
QUANTILE = 0.99  # about 1% of images like the validation set are flagged
MIN_CALIBRATION = 20  # fewer validation images: out-of-fold training distances are added
COMPONENTS = 128  # principal directions stored (1280 features: 0.65 MB as float32)
FOLDS = 5


@dataclass(frozen=True)
class Familiarity:
    """The training data's description; :meth:`scores` of pooled features, >1: unfamiliar."""

    means: np.ndarray  # (classes, D) class means
    components: np.ndarray  # (k, D) orthonormal principal directions of the covariance
    variances: np.ndarray  # (k,) the shrunk covariance's variance along each
    residual_variance: float  # its mean variance in the D - k other directions
    threshold: float = float("nan")  # distance at the calibration set's QUANTILE
    shrinkage: float = 0.0
    calibration: dict | None = None  # {"source": ..., "n": ...}

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The smallest Mahalanobis distance of each row of ``features`` to a class mean."""
        x = unit_length(np.asarray(features, np.float64).reshape(-1, self.n_features))
        means = self.means.astype(np.float64)
        comps = self.components.astype(np.float64)
        diff2 = (x * x).sum(1)[:, None] - 2 * x @ means.T + (means * means).sum(1)[None]
        proj = (x @ comps.T)[:, None, :] - (means @ comps.T)[None]  # (N, C, k)
        in_span = proj * proj
        d2 = (in_span / self.variances).sum(-1) + np.maximum(
            diff2 - in_span.sum(-1), 0.0
        ) / self.residual_variance
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distances divided by the threshold: 1 is the threshold, above it unfamiliar."""
        return self.distances(features) / self.threshold

    def meta(self) -> dict:
        """What ``microclf.json`` says about it (the threshold and method, readable)."""
        return {
            "file": FAMILIARITY_FILE,
            "method": METHOD,
            "version": FORMAT_VERSION,
            "features": FEATURE_LAYER,
            "normalize": NORMALIZE,
            "threshold": float(self.threshold),
            "quantile": QUANTILE,
            "components": int(len(self.components)),
            "shrinkage": round(float(self.shrinkage), 6),
            "calibration": self.calibration or {},
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            means=self.means.astype(np.float32),
            components=self.components.astype(np.float32),
            variances=self.variances.astype(np.float32),
            residual_variance=np.float64(self.residual_variance),
            threshold=np.float64(self.threshold),
            shrinkage=np.float64(self.shrinkage),
            version=np.int64(FORMAT_VERSION),
        )
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: str | Path, calibration: dict | None = None) -> Familiarity:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) > FORMAT_VERSION:
                raise ValueError(f"written by a newer napari-microclf (format {int(z['version'])})")
            return cls(
                z["means"],
                z["components"],
                z["variances"],
                float(z["residual_variance"]),
                float(z["threshold"]),
                float(z["shrinkage"]),
                calibration,
            )


def unit_length(features: np.ndarray) -> np.ndarray:
    """Each feature vector (last axis) scaled to length 1 (all-zero vectors stay zero)."""
    norm = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norm > 0, norm, 1.0)


def _within_class(features: np.ndarray, labels: np.ndarray, n_classes: int):
    """Class means and the features centred on their class's mean."""
    means = np.zeros((n_classes, features.shape[1]), np.float64)
    centred = np.empty_like(features, dtype=np.float64)
    for c in range(n_classes):
        rows = labels == c
        if rows.any():
            means[c] = features[rows].mean(0)
            centred[rows] = features[rows] - means[c]
    return means, centred


def describe(
    features: np.ndarray, labels: np.ndarray, n_classes: int, components: int = COMPONENTS
) -> Familiarity:
    """Class means and the Ledoit-Wolf-shrunk shared covariance, without a threshold.

    ``features``: ``(N, D)`` or ``(N, views, D)`` (every view of an image with its label);
    ``labels``: ``(N,)`` class indices. A class without images gets no mean (it is never
    the nearest: its mean is placed far away).
    """
    features = unit_length(np.asarray(features, np.float64))
    labels = np.asarray(labels)
    if features.ndim == 3:
        labels = np.repeat(labels, features.shape[1])
        features = features.reshape(-1, features.shape[-1])
    n, dim = features.shape
    if n < 2:
        raise ValueError("a familiarity description needs at least 2 training images")
    means, x = _within_class(features, labels, n_classes)
    present = np.bincount(labels, minlength=n_classes) > 0
    # The covariance S = X^T X / n through the smaller of X^T X (D x D) and the Gram matrix
    # X X^T (n x n), which share their non-zero eigenvalues; only the top k are computed.
    k = int(min(components, dim - 1, n - 1))
    if n <= dim:
        gram = x @ x.T / n
        trace, frob2 = float(np.trace(gram)), float(np.sum(gram * gram))
        lam, u = _top_eigen(gram, k)
        vec = (x.T @ u) / np.sqrt(np.maximum(lam, 1e-300) * n)
    else:
        cov = x.T @ x / n
        trace, frob2 = float(np.trace(cov)), float(np.sum(cov * cov))
        lam, vec = _top_eigen(cov, k)
    keep = lam > 1e-12 * max(float(lam[0]) if len(lam) else 0.0, 1e-300)
    lam, vec = lam[keep], vec[:, keep]
    k = len(lam)
    # Ledoit-Wolf (2004) shrinkage towards mu * I, as sklearn.covariance.ledoit_wolf_shrinkage
    mu = trace / dim
    beta_ = float(np.sum(np.sum(x * x, axis=1) ** 2))  # = sum((X^2)^T X^2)
    beta = (beta_ / n - frob2) / (dim * n)
    delta = (frob2 - 2 * mu * trace + dim * mu * mu) / dim
    shrinkage = 0.0 if beta <= 0 or delta <= 0 else min(beta, delta) / delta
    # the shrunk covariance (1 - a) S + a mu I: its top k variances, and the mean of the rest
    residual = ((1 - shrinkage) * (trace - float(lam.sum())) + shrinkage * mu * (dim - k)) / (
        dim - k
    )
    if not residual > 0:  # all features constant (a degenerate model): a unit scale
        residual = 1.0
    variances = np.maximum((1 - shrinkage) * lam + shrinkage * mu, residual * 1e-6)
    if not present.all():
        far = np.abs(means[present]).max() * 1e6 + 1e6
        means[~present] = far
    return Familiarity(means, vec.T.copy(), variances, residual, shrinkage=shrinkage)


def _top_eigen(sym: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending, >= 0) and their eigenvectors (columns)."""
    from scipy.linalg import eigh

    m = len(sym)
    if k <= 0:
        return np.zeros(0), np.zeros((m, 0))
    lam, vec = eigh(sym, subset_by_index=[m - k, m - 1], driver="evx")
    return np.clip(lam[::-1], 0, None), vec[:, ::-1]


def _out_of_fold(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    components: int,
    folds: int = FOLDS,
    seed: int = 0,
) -> np.ndarray:
    """Each training image's distance to a description fitted without its fold (view 0)."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for f in range(min(folds, n)):
        held = order[f :: min(folds, n)]
        rest = np.setdiff1d(order, held)
        if len(rest) < 2:
            continue
        fam = describe(features[rest], labels[rest], n_classes, components)
        plain = features[held, 0] if features.ndim == 3 else features[held]
        out[held] = fam.distances(plain)
    return out


def fit_familiarity(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    n_classes: int,
    val_features: np.ndarray | None = None,
    *,
    components: int = COMPONENTS,
    quantile: float = QUANTILE,
    seed: int = 0,
) -> Familiarity:
    """Describe the training images and calibrate the threshold on the validation images.

    Parameters
    ----------
    train_features : ndarray
        ``(N, D)`` pooled backbone features of the training images, or ``(N, views, D)``
        with augmented views (view 0 the plain image).
    train_labels : ndarray
        ``(N,)`` class indices.
    n_classes : int
    val_features : ndarray, optional
        ``(M, D)`` features of the validation images: the threshold is their ``quantile``
        distance. With fewer than :data:`MIN_CALIBRATION` of them, out-of-fold distances of
        the training images join them.

    Returns
    -------
    Familiarity

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> seen = np.eye(8)[0] + 0.1 * rng.normal(size=(250, 8))  # all near one direction
    >>> fam = fit_familiarity(seen[:200], np.arange(200) % 2, 2, seen[200:], components=4)
    >>> fam.scores(seen[:3]).round(1), fam.scores(np.eye(8)[7:]).round(1)
    (array([0.5, 0.7, 0.6]), array([3.9]))
    """
    train_features = np.asarray(train_features, np.float64)
    train_labels = np.asarray(train_labels)
    fam = describe(train_features, train_labels, n_classes, components)
    val = np.zeros((0, fam.n_features)) if val_features is None else np.asarray(val_features)
    calibration_scores = fam.distances(val) if len(val) else np.zeros(0)
    source = "validation"
    if len(val) < MIN_CALIBRATION:
        oof = _out_of_fold(train_features, train_labels, n_classes, components, seed=seed)
        calibration_scores = np.concatenate([calibration_scores, oof])
        source = "validation and out-of-fold training" if len(val) else "out-of-fold training"
    threshold = float(np.quantile(calibration_scores, quantile))
    return Familiarity(
        fam.means,
        fam.components,
        fam.variances,
        fam.residual_variance,
        threshold,
        fam.shrinkage,
        {"source": source, "n": int(len(calibration_scores)), "n_validation": int(len(val))},
    )


def base_features(model, batch_size: int = 32, forward=None):
    """A function from preprocessed images ``(N, H, W, 3)`` to their ``(N, D)`` pooled
    features through ``model``'s own base (fine-tuned or not), in inference mode. Make it
    once for all the subsets of a model: TensorFlow traces the base once per function.
    ``forward``: the classifier as another engine runs it (:func:`~.engine.classifier_forward`)."""
    if forward is None:
        return FeatureExtractor(model, seed=0, batch_size=batch_size)

    def extract(x):
        step = max(batch_size, 1)
        parts = [forward(x[i : i + step])[1] for i in range(0, len(x), step)]
        return np.concatenate(parts) if parts else forward(x)[1]

    return extract


def pooled_features(model, images, batch_size: int = 32, forward=None, extract=None) -> np.ndarray:
    """``(N, D)`` pooled backbone features through ``model``'s own base (fine-tuned or not),
    in inference mode, of preprocessed ``images`` (an array) or of the pages of a
    :class:`~.pipeline.PageSource` (read in chunks, never all at once); ``extract``: a
    :func:`base_features` of ``model`` made before (else one is made)."""
    if extract is None:
        extract = base_features(model, batch_size, forward)
    if isinstance(images, np.ndarray):
        return extract(np.asarray(images, np.float32))
    parts = [extract(chunk) for chunk in images.chunks(CHUNK_BATCHES * batch_size)]
    return np.concatenate(parts) if parts else extract(np.zeros((0, *images.shape[1:]), np.float32))


def fit_for_training(
    model,
    inputs: dict,
    y: dict,
    n_classes: int,
    cached: bool,
    batch_size: int = 32,
    seed: int = 0,
    forward=None,
    extract=None,
) -> tuple[Familiarity, float]:
    """:func:`fit_familiarity` from a training's inputs: cached features as they are, or
    images through the trained model's base (run by ``forward`` where given, or by
    ``extract``: see :func:`pooled_features`). Returns it and the seconds it took."""
    t0 = time.perf_counter()
    if cached:
        train_f, val_f = inputs["train"], inputs["val"]
    else:
        extract = extract or base_features(model, batch_size, forward)
        train_f = pooled_features(model, inputs["train"], batch_size, extract=extract)
        val_f = (
            pooled_features(model, inputs["val"], batch_size, extract=extract)
            if len(inputs["val"])
            else None
        )
    fam = fit_familiarity(train_f, y["train"], n_classes, val_f, seed=seed)
    return fam, time.perf_counter() - t0


def load_familiarity(folder: str | Path, meta: dict) -> Familiarity | None:
    """The bundle's description, or None for a bundle without one (trained before it
    existed). A listed but missing or unreadable file is said with a warning, not raised:
    the classes are still right, only the unfamiliar scores are missing."""
    info = meta.get("familiarity")
    if not isinstance(info, dict):
        return None
    path = Path(folder) / info.get("file", FAMILIARITY_FILE)
    try:
        fam = Familiarity.from_file(path, info.get("calibration"))
    except (OSError, ValueError, KeyError) as exc:
        warnings.warn(
            f"{path} cannot be read ({exc}); predictions of this model have no "
            "unfamiliar score. Retrain the model to make it again.",
            stacklevel=2,
        )
        return None
    if fam.means.shape[0] != len(meta.get("class_names", [])) or not fam.threshold > 0:
        warnings.warn(
            f"{path} does not match the model's classes; predictions have no "
            "unfamiliar score. Retrain the model to make it again.",
            stacklevel=2,
        )
        return None
    return fam
