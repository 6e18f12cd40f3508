import numpy as np

from incompat.baselines import activation_clustering, spectral_signatures


def features_with_planted_cluster(seed=0):
    """Three classes of Gaussian features; class 1 also holds 30 'poisons' shifted along one direction."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for c in range(3):
        feats.append(rng.normal(size=(200, 16)) + 5 * np.eye(16)[c])
        labels += [c] * 200
    shift = 6 * np.eye(16)[10]
    feats.append(rng.normal(size=(30, 16)) + 5 * np.eye(16)[1] + shift)
    labels += [1] * 30
    poison = np.zeros(len(labels), dtype=bool)
    poison[-30:] = True
    return np.vstack(feats), np.array(labels), poison


def test_spectral_signatures_removes_the_outlying_direction():
    feats, labels, poison = features_with_planted_cluster()
    result = spectral_signatures(feats, labels, 3, epsilon=0.1, removal_factor=1.5)
    assert result.remove_mask[poison].all()
    # 1.5 * epsilon of every class is removed, as in Tran et al.
    assert result.remove_mask[labels == 0].sum() == int(np.ceil(0.15 * 200))
    assert result.scores[poison].min() > np.median(result.scores[(labels == 1) & ~poison])


def test_activation_clustering_flags_only_the_small_cluster():
    feats, labels, poison = features_with_planted_cluster()
    result = activation_clustering(feats, labels, 3)
    assert result.remove_mask[poison].mean() >= 0.9
    assert result.remove_mask[labels != 1].sum() == 0  # unimodal classes: the 2-means split is balanced
    assert result.remove_mask[(labels == 1) & ~poison].mean() <= 0.05
