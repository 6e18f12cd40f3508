"""Classic poison detectors for side-by-side comparison, on penultimate-layer activations of a model trained on the
(poisoned) data.

Implemented here rather than taken from ART: ART's detectors have open reports of reading the wrong layer and of
clustering unflattened activations, and the two algorithms are a few lines each over a feature matrix.

- Spectral signatures (Tran, Li & Madry 2018): per class, centre the representations, score each sample by its
  squared projection on the top right-singular vector, remove the `removal_factor * epsilon` highest-scoring share.
- Activation clustering (Chen et al. 2018): per class, reduce the activations to `components` dimensions with ICA,
  split them with 2-means, and flag the smaller cluster when it holds at most `max_cluster_fraction` of the class
  (their "relative size" analysis).
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
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    features = np.asarray(features, dtype=np.float64)
    remove = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels))
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < max(4, components + 1):
            continue
        x = features[rows]
        x = x - x.mean(axis=0)
        n_comp = min(components, x.shape[1], len(rows) - 1)
        try:
            with warnings.catch_warnings():
                # Non-convergence only means the components are approximate; 2-means still runs on them.
                warnings.simplefilter("ignore", ConvergenceWarning)
                reduced = FastICA(n_components=n_comp, random_state=seed, max_iter=400,
                                  whiten="unit-variance").fit_transform(x)
        except (ValueError, np.linalg.LinAlgError):
            reduced = x[:, :n_comp]
        assignment = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(assignment, minlength=2)
        small = int(np.argmin(sizes))
        fraction = sizes[small] / len(rows)
        # Score: 1 - relative size of the sample's cluster, so the smaller cluster ranks first.
        scores[rows] = 1.0 - sizes[assignment] / len(rows)
        if fraction <= max_cluster_fraction:
            remove[rows[assignment == small]] = True
    return DetectorResult(remove, scores)
