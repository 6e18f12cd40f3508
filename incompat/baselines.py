"""Classic poison detectors for side-by-side comparison, on penultimate-layer activations of a model trained on the
(poisoned) data.

Implemented here rather than taken from ART: ART's detectors have open reports of reading the wrong layer and of
clustering unflattened activations, and the two algorithms are a few lines each over a feature matrix.

- Spectral signatures (Tran, Li & Madry 2018): per class, centre the representations, score each sample by its
  squared projection on the top right-singular vector, remove the `removal_factor * epsilon` highest-scoring share.
- Activation clustering (Chen et al. 2018): per class, reduce the activations to `components` dimensions with ICA,
  split them with 2-means, and flag the smaller cluster when it holds at most `max_cluster_fraction` of the class
  (their "relative size" analysis).
- SPECTRE (Hayase et al. 2021), the robust-statistics peer: per class, reduce to the top principal directions,
  estimate mean and covariance robustly (iterated trimming, so the poisons do not set the scale they are
  judged by), whiten, and score each sample by its QUantum Entropy score; remove `removal_factor * epsilon`
  of the class as spectral signatures does. Whitening is what lets it find a poison direction whose variance is
  small next to the benign directions, which the plain top singular vector misses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class DetectorResult:
    remove_mask: np.ndarray  # bool (N,)
    scores: np.ndarray  # float (N,), higher = more suspicious (comparable within a class)


def spectral_signatures(features: np.ndarray, labels: np.ndarray, n_classes: int, epsilon: float = 0.1,
                        removal_factor: float = 1.5) -> DetectorResult:
    features = np.asarray(features, dtype=np.float64)
    remove = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels))
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        centred = features[rows] - features[rows].mean(axis=0)
        # Top right-singular vector of the centred representation matrix.
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        class_scores = (centred @ vt[0]) ** 2
        scores[rows] = class_scores
        # round() first: 1.5 * 0.1 * 200 is 30.000000000000004 in floating point, not 31 samples.
        n_remove = min(len(rows), int(np.ceil(round(removal_factor * epsilon * len(rows), 6))))
        if n_remove:
            remove[rows[np.argsort(-class_scores, kind="stable")[:n_remove]]] = True
    return DetectorResult(remove, scores)


def activation_clustering(features: np.ndarray, labels: np.ndarray, n_classes: int, components: int = 10,
                          max_cluster_fraction: float = 0.35, seed: int = 0) -> DetectorResult:
    features = np.asarray(features, dtype=np.float64)
    remove = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels))
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < max(4, components + 1):
            continue
        _, assignment = ica_two_means(features[rows], components, seed)
        sizes = np.bincount(assignment, minlength=2)
        small = int(np.argmin(sizes))
        fraction = sizes[small] / len(rows)
        # Score: 1 - relative size of the sample's cluster, so the smaller cluster ranks first.
        scores[rows] = 1.0 - sizes[assignment] / len(rows)
        if fraction <= max_cluster_fraction:
            remove[rows[assignment == small]] = True
    return DetectorResult(remove, scores)


def ica_two_means(x: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One class's centred rows reduced to independent components (the first `components` coordinates when ICA
    fails) and split in two by 2-means: (reduced rows, cluster of each row). Activation clustering's recipe."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    n_comp = min(components, x.shape[1], len(x) - 1)
    try:
        with warnings.catch_warnings():
            # Non-convergence only means the components are approximate; 2-means still runs on them.
            warnings.simplefilter("ignore", ConvergenceWarning)
            reduced = FastICA(n_components=n_comp, random_state=seed, max_iter=400,
                              whiten="unit-variance").fit_transform(x)
    except (ValueError, np.linalg.LinAlgError):
        reduced = x[:, :n_comp]
    return reduced, KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)


def _que_scores(whitened: np.ndarray, alpha: float) -> np.ndarray:
    """QUantum Entropy outlier scores of whitened rows: tau_i = z_i' Q z_i / tr(Q), Q = exp(alpha (S - I) /
    (||S|| - 1)), S the rows' second moment. alpha = 0 is the Mahalanobis norm; a large alpha tends to the squared
    projection on S's top direction. Computed from S's eigendecomposition (S is symmetric)."""
    n = len(whitened)
    second = whitened.T @ whitened / n
    eigvals, eigvecs = np.linalg.eigh(second)
    top = eigvals[-1]
    if top <= 1.0 + 1e-9:  # no direction stands out after whitening: Q is the identity
        weights = np.ones_like(eigvals)
    else:
        weights = np.exp(alpha * (eigvals - 1.0) / (top - 1.0) - alpha)  # exp(-alpha) rescales; tau is a ratio
    projected = whitened @ eigvecs
    return (projected ** 2 @ weights) / weights.sum()


def _trimmed_estimate(x: np.ndarray, keep: float, rounds: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the `keep` share of rows closest to the estimate itself, found by iterated trimming
    from the coordinate-wise median and MAD. Started from the robust diagonal, a tight poison cluster is far out from
    the first step and never enters; sklearn's FastMCD (random starts of p+1 rows) was seen to settle on subsets
    that held most of such a cluster."""
    h = max(x.shape[1] + 1, int(np.ceil(keep * len(x))))
    mean = np.median(x, axis=0)
    mad = np.median(np.abs(x - mean), axis=0) * 1.4826
    cov = np.diag(np.maximum(mad, 1e-12) ** 2)
    kept = None
    for _ in range(rounds):
        precision = np.linalg.pinv(cov, hermitian=True)
        distance = np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)
        closest = np.argsort(distance, kind="stable")[:h]
        if kept is not None and np.array_equal(np.sort(closest), kept):
            break
        kept = np.sort(closest)
        mean = x[kept].mean(axis=0)
        cov = np.cov(x[kept], rowvar=False).reshape(x.shape[1], x.shape[1])
    return mean, cov


def spectre(features: np.ndarray, labels: np.ndarray, n_classes: int, epsilon: float = 0.1,
            removal_factor: float = 1.5, dims: int = 32, alpha: float = 4.0, seed: int = 0,
            rows_per_dim: int = 4) -> DetectorResult:
    features = np.asarray(features, dtype=np.float64)
    remove = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels))
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        k = min(dims, features.shape[1], len(rows) // rows_per_dim)
        if k < 1:
            continue
        centred = features[rows] - features[rows].mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        reduced = centred @ vt[:k].T
        mean, cov = _trimmed_estimate(reduced, keep=min(1.0, max(0.5, 1.0 - removal_factor * epsilon)))
        eigvals, eigvecs = np.linalg.eigh(cov)
        inverse_root = eigvecs / np.sqrt(np.maximum(eigvals, 1e-12 * max(eigvals.max(), 1e-12)))
        class_scores = _que_scores((reduced - mean) @ inverse_root, alpha)
        scores[rows] = class_scores
        n_remove = min(len(rows), int(np.ceil(round(removal_factor * epsilon * len(rows), 6))))
        if n_remove:
            remove[rows[np.argsort(-class_scores, kind="stable")[:n_remove]]] = True
    return DetectorResult(remove, scores)
