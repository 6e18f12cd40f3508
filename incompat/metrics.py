"""Evaluation metrics: clean accuracy, attack success, the paper's targeted misclassification, detection confusion.

Every function takes plain arrays, refuses empty input (ValueError: an empty test set is a pipeline bug, not a
score of 0 or 1) and returns Python floats/ints, so the results go straight into JSON.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clean_accuracy", "attack_success_rate", "targeted_misclassification", "attack_neutralised",
           "detection_confusion"]


def _nonempty_1d(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    return arr


def _int_array(values, what: str) -> np.ndarray:
    arr = _nonempty_1d(values, what)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices, got {arr.dtype}")
    return arr


def _bool_array(values, what: str) -> np.ndarray:
    arr = _nonempty_1d(values, what)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must be a boolean mask, got values other than 0/1 ({arr.dtype})")
        arr = arr.astype(bool)
    return arr


def _same_length(*pairs: tuple[np.ndarray, str]) -> None:
    lengths = {len(a) for a, _ in pairs}
    if len(lengths) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{name} has {len(a)}" for a, name in pairs))


def clean_accuracy(preds, labels) -> float:
    """Fraction of `preds` equal to `labels`."""
    preds, labels = _int_array(preds, "preds"), _int_array(labels, "labels")
    _same_length((preds, "preds"), (labels, "labels"))
    return float((preds == labels).mean())


def attack_success_rate(preds_on_triggered, target: int) -> float:
    """Fraction of the triggered test images (the source class's, trigger applied) predicted as `target`."""
    preds = _int_array(preds_on_triggered, "preds_on_triggered")
    return float((preds == int(target)).mean())


def targeted_misclassification(preds_clean, preds_triggered, labels, target: int) -> float:
    """The paper's metric: among triggered images whose CLEAN version is classified correctly, the fraction
    classified as `target` once triggered. `preds_clean[i]`, `preds_triggered[i]` and `labels[i]` describe the
    same image. Returns 0.0 when no clean version is classified correctly (no image the attack could flip:
    documented choice, so a useless model does not count as attacked)."""
    clean = _int_array(preds_clean, "preds_clean")
    triggered = _int_array(preds_triggered, "preds_triggered")
    labels = _int_array(labels, "labels")
    _same_length((clean, "preds_clean"), (triggered, "preds_triggered"), (labels, "labels"))
    correct = clean == labels
    if not correct.any():
        return 0.0
    return float((triggered[correct] == int(target)).mean())


def attack_neutralised(tmr_after: float, oracle_tmr: float) -> bool:
    """The paper's success criterion for one scenario, with the model's own floor: the targeted misclassification
    after the defense is at most 1%, or at most half a point above the oracle's (trained on the truly clean set), so
    a small model whose natural confusion of the pair is above 1% can still pass. Both are fractions."""
    for value, what in ((tmr_after, "tmr_after"), (oracle_tmr, "oracle_tmr")):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{what} must be a fraction in [0, 1], got {value}")
    return float(tmr_after) <= max(0.01, float(oracle_tmr) + 0.005) + 1e-12


def detection_confusion(removed_mask, poison_mask) -> dict:
    """How a defense's removal matches the ground truth (both boolean masks over the training set).

    Keys: poison_total, poison_removed, clean_total, clean_removed (ints) and
      recall                  = poison_removed / poison_total; 1.0 when there is no poison (nothing to miss)
      precision               = poison_removed / (poison_removed + clean_removed); 1.0 when nothing was removed
                                (no false alarm was raised)
      clean_removed_fraction  = clean_removed / clean_total; 0.0 when there is no clean sample
    """
    removed = _bool_array(removed_mask, "removed_mask")
    poison = _bool_array(poison_mask, "poison_mask")
    _same_length((removed, "removed_mask"), (poison, "poison_mask"))
    poison_total = int(poison.sum())
    poison_removed = int((removed & poison).sum())
    clean_total = int((~poison).sum())
    clean_removed = int((removed & ~poison).sum())
    total_removed = poison_removed + clean_removed
    return {
        "poison_total": poison_total,
        "poison_removed": poison_removed,
        "clean_total": clean_total,
        "clean_removed": clean_removed,
        "recall": poison_removed / poison_total if poison_total else 1.0,
        "precision": poison_removed / total_removed if total_removed else 1.0,
        "clean_removed_fraction": clean_removed / clean_total if clean_total else 0.0,
    }
