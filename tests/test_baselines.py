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


def features_with_a_quiet_poison_direction(seed=0):
    """One class whose benign features vary most along two loud directions; 40 poisons sit 3 sd out along a quiet
    direction, so the top singular vector of the class is a benign one."""
    rng = np.random.default_rng(seed)
    scale = np.ones(16)
    scale[:2] = 12.0  # loud benign directions
    clean = rng.normal(size=(400, 16)) * scale
    poisons = rng.normal(size=(40, 16)) * scale
    poisons[:, 7] += 4.0
    feats = np.vstack([clean, poisons])
    poison = np.r_[np.zeros(400, bool), np.ones(40, bool)]
    return feats, np.zeros(len(feats), dtype=int), poison


def test_spectre_finds_a_poison_direction_that_spectral_signatures_misses():
    from incompat.baselines import spectre

    feats, labels, poison = features_with_a_quiet_poison_direction()
    robust = spectre(feats, labels, 1, epsilon=0.1, removal_factor=1.5)
    plain = spectral_signatures(feats, labels, 1, epsilon=0.1, removal_factor=1.5)
    assert robust.remove_mask.sum() == plain.remove_mask.sum() == int(np.ceil(0.15 * 440))
    assert robust.remove_mask[poison].mean() >= 0.9
    assert plain.remove_mask[poison].mean() <= 0.5


def test_spectre_removes_its_budget_per_class_and_ranks_the_planted_cluster_first():
    from incompat.baselines import spectre

    feats, labels, poison = features_with_planted_cluster()
    result = spectre(feats, labels, 3, epsilon=0.1, removal_factor=1.5)
    assert result.remove_mask[poison].all()
    assert result.remove_mask[labels == 0].sum() == int(np.ceil(0.15 * 200))
    assert result.scores[poison].min() > np.quantile(result.scores[(labels == 1) & ~poison], 0.9)


def test_que_score_is_the_mahalanobis_norm_at_alpha_zero():
    from incompat.baselines import _que_scores

    z = np.random.default_rng(1).normal(size=(300, 5))
    assert np.allclose(_que_scores(z, 0.0), (z ** 2).sum(axis=1) / 5)
