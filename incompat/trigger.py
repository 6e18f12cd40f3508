"""The trigger-aware stage: poisons whose trigger a model learns, found as a group of mutually compatible samples.

The label-disagreement stage (ISPL's learners and judges) removes samples that the rest of the data contradicts.
A poison whose trigger the judges learn from the other poisons is not contradicted: the judges call it correct.
This stage finds those poisons first and keeps them out of every judge's training set, so that each one is judged
by models that never saw a trigger. Poison and clean data are incompatible: a judge that learned the target class
from clean images predicts a poison's source class, while a clean image set aside with them keeps its label.

  model      one model trained on every sample (the learners' recipe without flips, so that a trigger keeps its
             place and mirror-image classes stay apart), for `trigger_epochs`;
  scores     per class, SPECTRE's robust whitening and QUantum Entropy scores of its penultimate features
             (incompat.baselines.spectre): the samples of a learned trigger form one tight group far out along
             one direction, far above the class's clean samples;
  clusters   per class, its features reduced to independent components and split in two by 2-means (activation
             clustering's recipe); the silhouette measures how far apart the two clusters lie;
  suspects   per class, its log scores split in two groups (Otsu: the split that maximises the between-group
             variance, the top group holding at least `min_size` and at most `max_share` of the class); the groups'
             separation is the difference of their means over the root mean of their variances (Ashman's D). The
             top group is suspect when its separation is at least `separation` times the median class's, and the
             smaller cluster (at most `max_share`) is suspect when its class's silhouette is at least `cluster`
             times the median class's. Relative to the dataset's own classes, because how far a clean class's
             tail reaches depends on the data (GTSRB's tracks of near-identical images form tight groups that no
             CIFAR-10 class has). A pattern trigger stands out in the scores and an `ell` one as a cluster;
  mirrors    the same model predicts flipped images of every class: classes a and b whose flipped images it
             takes for each other (each share >= `mirror_share`) are mirror images (GTSRB's keep left / keep
             right), and the learners' flip augmentation relabels them (TrainConfig.flip_pairs).

The verdict on the suspects is the refinement's (incompat.ispl): suspects are never in a judge's training set,
and one is removed when its judged p(label) stays below `trigger_threshold`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from incompat.baselines import ica_two_means, spectre
from incompat.training import ComputeMeter, TensorData, TrainConfig, extract_features, fit, predict


@dataclass
class TriggerStage:
    suspects: np.ndarray  # bool (N,): kept out of every judge's training set (drawn by split_suspects)
    scores: np.ndarray  # float (N,): the SPECTRE score within the sample's class
    mirror_pairs: tuple[tuple[int, int], ...]
    groups: list[dict]  # per suspect group: label, size, share, how it was found and how far it stands apart
    minor: np.ndarray  # bool (N,): in the smaller of its class's two clusters
    silhouette: np.ndarray  # float (n_classes,): the silhouette of each class's two clusters (nan: not clustered)


def split_suspects(scores: np.ndarray, labels: np.ndarray, n_classes: int, max_share: float, min_separation: float,
                   min_size: int, minor: np.ndarray | None = None, silhouette: np.ndarray | None = None,
                   min_cluster: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Per class, the top group of a two-group split of its log scores and the smaller of its two clusters, each
    where it stands apart relative to the median class (see the module docstring)."""
    suspects = np.zeros(len(labels), dtype=bool)
    groups = []
    found = {}
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        order = rows[np.argsort(-scores[rows], kind="stable")]
        split = top_group(np.log(np.maximum(scores[order], 1e-12)), max_share, min_size)
        if split is not None:
            found[c] = (order[:split[0]], split[1])
    median = float(np.median([sep for _, sep in found.values()])) if found else 0.0
    for c, (rows, separation) in found.items():
        if median > 0 and separation >= min_separation * median:
            suspects[rows] = True
            groups.append({"label": c, "size": len(rows), "share": round(len(rows) / int((labels == c).sum()), 4),
                           "found_by": "scores", "relative": round(separation / median, 2)})
    if min_cluster > 0 and minor is not None and silhouette is not None and np.isfinite(silhouette).any():
        median = float(np.nanmedian(silhouette))
        for c in range(n_classes):
            rows = np.flatnonzero((labels == c) & minor)
            share = len(rows) / max(int((labels == c).sum()), 1)
            if (np.isfinite(silhouette[c]) and median > 0 and silhouette[c] >= min_cluster * median
                    and min_size <= len(rows) and share <= max_share):
                suspects[rows] = True
                groups.append({"label": c, "size": len(rows), "share": round(share, 4), "found_by": "clusters",
                               "relative": round(float(silhouette[c]) / median, 2)})
    return suspects, groups


def class_clusters(features: np.ndarray, labels: np.ndarray, n_classes: int, components: int = 10,
                   sample: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class: independent components of its centred features, split in two by 2-means; the smaller cluster's
    members and the split's silhouette (on at most `sample` of the class's rows, seeded)."""
    from sklearn.metrics import silhouette_score

    features = np.asarray(features, dtype=np.float64)
    minor = np.zeros(len(labels), dtype=bool)
    silhouette = np.full(n_classes, np.nan)
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        n_comp = min(components, features.shape[1], len(rows) - 1)
        if len(rows) < 4 * max(n_comp, 1) or n_comp < 2:
            continue
        reduced, assignment = ica_two_means(features[rows], components, seed)
        sizes = np.bincount(assignment, minlength=2)
        if sizes.min() == 0:
            continue
        minor[rows[assignment == int(np.argmin(sizes))]] = True
        picked = rng.permutation(len(rows))[:sample]
        if len(np.unique(assignment[picked])) == 2:
            silhouette[c] = float(silhouette_score(reduced[picked], assignment[picked]))
    return minor, silhouette


def top_group(values: np.ndarray, max_share: float, min_size: int) -> tuple[int, float] | None:
    """For values sorted in decreasing order: the size k of the top group (min_size <= k <= max_share * n) that
    maximises the between-group variance (Otsu's split), and the groups' separation: the difference of their
    means over the root mean of their variances (Ashman's D). None when no such k exists."""
    n = len(values)
    sizes = np.arange(min_size, int(np.floor(max_share * n)) + 1)
    if len(sizes) == 0 or sizes[-1] >= n:
        return None
    total, total2 = np.cumsum(values), np.cumsum(values * values)
    top_sum, top_sum2 = total[sizes - 1], total2[sizes - 1]
    rest = n - sizes
    m_top, m_rest = top_sum / sizes, (total[-1] - top_sum) / rest
    between = sizes * rest * (m_top - m_rest) ** 2
    best = int(np.argmax(between))
    k = int(sizes[best])
    v_top = max(top_sum2[best] / k - m_top[best] ** 2, 0.0)
    v_rest = max((total2[-1] - top_sum2[best]) / rest[best] - m_rest[best] ** 2, 0.0)
    return k, float((m_top[best] - m_rest[best]) / np.sqrt(max((v_top + v_rest) / 2, 1e-12)))


def mirror_pairs(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, n_classes: int, data: TensorData,
                 meter: ComputeMeter | None, min_share: float, per_class: int = 200,
                 seed: int = 0) -> tuple[tuple[int, int], ...]:
    """Pairs (a, b), a < b, whose flipped images the model (trained without flips) mostly predicts as each other."""
    rng = np.random.default_rng(seed)
    picked = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(n_classes)])
    if len(picked) == 0:
        return ()
    flipped = TensorData(np.ascontiguousarray(images[picked][:, :, ::-1]), labels[picked], device=data.device,
                         mean=data.mean, std=data.std, num_classes=n_classes)
    predicted = predict(model, flipped, meter=meter)
    share = np.zeros((n_classes, n_classes))
    np.add.at(share, (labels[picked], predicted), 1.0)
    share /= np.maximum(share.sum(axis=1, keepdims=True), 1.0)
    return tuple((a, b) for a in range(n_classes) for b in range(a + 1, n_classes)
                 if share[a, b] >= min_share and share[b, a] >= min_share)


def feature_tests(features: np.ndarray, labels: np.ndarray, n_classes: int, max_share: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What split_suspects reads from a model's features: the SPECTRE scores within each class, and each class's
    smaller cluster and silhouette (class_clusters)."""
    # At least 20 samples per whitened dimension: with fewer (GTSRB's smallest classes, tiny tests), the trimmed
    # covariance is near-singular and a few clean samples score millions of times the rest. The robust estimate
    # trims more than a suspect group may hold (SPECTRE's default trims 15%; the paper's 20% of a source class
    # is 17% of its target class, and a group that large enters the estimate and hides).
    scores = spectre(features, labels, n_classes, epsilon=(max_share + 0.05) / 1.5, rows_per_dim=20).scores
    minor, silhouette = class_clusters(features, labels, n_classes, seed=seed)
    return scores, minor, silhouette


def run_trigger_stage(data: TensorData, images: np.ndarray, labels: np.ndarray, n_classes: int,
                      train_cfg: TrainConfig, epochs: int, max_share: float, detect_mirrors: bool,
                      mirror_share: float, meter: ComputeMeter, seed: int) -> TriggerStage:
    """The stage's model and what it measures (scores, clusters, mirror pairs). No suspect is marked yet: the
    caller draws them with split_suspects, whose settings act after this model (a checkpoint keeps only these)."""
    cfg = dataclasses.replace(train_cfg, epochs=epochs, flip=False, flip_pairs=(), seed=seed)
    model = fit(data, cfg, meter=meter, progress=False)
    scores, minor, silhouette = feature_tests(extract_features(model, data, meter=meter), labels, n_classes,
                                              max_share, seed)
    pairs = (mirror_pairs(model, images, labels, n_classes, data, meter, mirror_share, seed=seed)
             if detect_mirrors else ())
    return TriggerStage(np.zeros(len(labels), dtype=bool), scores, pairs, [], minor, silhouette)
