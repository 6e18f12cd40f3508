"""Poison recall of a suspicion ranking at a clean-removal budget, and the weak learners a checkpoint folder holds.

Shared by bench/compare_detection.py and the research scripts in bench/research/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from incompat.ispl import LearnerRecord  # noqa: E402


def _depth(clean_seen: np.ndarray, n_clean: int, fraction: float) -> int:
    """How many of the ranked samples the deepest cut with at most `fraction` of the clean images removed takes."""
    # Counted in images, not fractions: a baseline's budget of k/n_clean must allow exactly k clean images.
    budget = int(np.floor(fraction * n_clean + 1e-9))
    return int(np.searchsorted(clean_seen, budget, side="right"))


def recall_at(score: np.ndarray, poison: np.ndarray, clean_fractions=(0.01, 0.05, 0.10)) -> list[float]:
    """Poison recall of the ranking cut as deep as it goes with at most each fraction of the clean images removed."""
    order = np.argsort(-score, kind="stable")
    clean_seen = np.cumsum(~poison[order])
    caught = np.cumsum(poison[order]) / max(1, int(poison.sum()))
    n_clean = int((~poison).sum())
    recalls = []
    for fraction in clean_fractions:
        last = _depth(clean_seen, n_clean, fraction) - 1
        recalls.append(float(caught[last]) if last >= 0 else 0.0)
    return recalls


def removed_at(score: np.ndarray, poison: np.ndarray, fraction: float) -> np.ndarray:
    """The removed mask of the same cut as recall_at's, at one clean fraction."""
    order = np.argsort(-score, kind="stable")
    removed = np.zeros(len(score), dtype=bool)
    removed[order[:_depth(np.cumsum(~poison[order]), int((~poison).sum()), fraction)]] = True
    return removed


def load_learners(folder: Path) -> list[LearnerRecord]:
    """The weak learners a checkpoint folder holds, in training order (read-only: no fingerprint check, unlike
    `Checkpoint`, which discards the learners of other parameters)."""
    learners = []
    for path in sorted(folder.glob("learner-*.npz")):
        with np.load(path, allow_pickle=False) as arrays:
            learners.append(LearnerRecord(0, len(learners), arrays["core_set"].astype(bool),
                                          arrays["predictions"].astype(np.int64), arrays["probabilities"], []))
    return learners
