"""How far the weak learners of a finished sanitize run can separate poisons from clean images.

Reads a run folder written by `incompat sanitize ... --truth truth.parquet` (its checkpoints/ hold every learner's
core set and probabilities) and ranks all samples by three scores: the held-out p(label) (only learners whose core
set does not hold the sample), the mean p(label) over all learners, and the review score (`attack_score`, the
score `review_order` gives removed samples, applied to every sample). Prints the poison recall when the top of each
ranking is removed until 1%, 5% and 10% of the clean images are gone. No decision rule that thresholds one of these
scores does better than its line.

  .venv/bin/python bench/research_ceiling.py runs/s1 --truth data/poisoned/truth.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incompat.data import read_dataset  # noqa: E402
from incompat.ispl import LearnerRecord, attack_score, held_out_probabilities  # noqa: E402
from incompat.sanitize import read_truth  # noqa: E402


def recall_at(score: np.ndarray, poison: np.ndarray, clean_fractions=(0.01, 0.05, 0.10)) -> list[float]:
    """Poison recall of the ranking cut as deep as it goes with at most each fraction of the clean images removed."""
    order = np.argsort(-score, kind="stable")
    clean_seen = np.cumsum(~poison[order])
    caught = np.cumsum(poison[order]) / max(1, int(poison.sum()))
    n_clean = int((~poison).sum())
    recalls = []
    for fraction in clean_fractions:
        # Counted in images, not fractions: a baseline's budget of k/n_clean must allow exactly k clean images.
        budget = int(np.floor(fraction * n_clean + 1e-9))
        last = int(np.searchsorted(clean_seen, budget, side="right")) - 1  # the deepest cut within the budget
        recalls.append(float(caught[last]) if last >= 0 else 0.0)
    return recalls


def load_learners(folder: Path) -> list[LearnerRecord]:
    """The weak learners a checkpoint folder holds, in training order (read-only: no fingerprint check, unlike
    `Checkpoint`, which discards the learners of other parameters)."""
    learners = []
    for path in sorted(folder.glob("learner-*.npz")):
        with np.load(path, allow_pickle=False) as arrays:
            learners.append(LearnerRecord(0, len(learners), arrays["core_set"].astype(bool),
                                          arrays["predictions"].astype(np.int64), arrays["probabilities"], []))
    return learners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--truth", type=Path, required=True)
    args = ap.parse_args()
    dataset = read_dataset(args.run_dir / "dataset.parquet")
    labels = np.asarray(dataset.labels, dtype=np.int64)
    poison = read_truth(args.truth, dataset)
    learners = load_learners(args.run_dir / "checkpoints")
    if not learners:
        sys.exit(f"{args.run_dir}/checkpoints: no learner checkpoints")
    n, k = len(labels), learners[0].probabilities.shape[1]
    mean_probs = np.mean([rec.probabilities.astype(np.float64) for rec in learners], axis=0)
    held_out = held_out_probabilities(learners).astype(np.float64)
    scores = {
        "held-out p(label)": 1.0 - held_out[np.arange(n), labels],
        "mean p(label)": 1.0 - mean_probs[np.arange(n), labels],
        "review score": attack_score(mean_probs, labels, k),
    }
    print(f"# {args.run_dir}: {n} samples, {int(poison.sum())} poisons, {len(learners)} learners")
    print(f"{'ranking':20} {'recall @1% clean':>17} {'@5%':>7} {'@10%':>7}")
    for name, score in scores.items():
        r1, r5, r10 = recall_at(score, poison)
        print(f"{name:20} {r1:17.1%} {r5:7.1%} {r10:7.1%}")


if __name__ == "__main__":
    main()
