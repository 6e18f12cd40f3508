"""How far the weak learners of a finished sanitize run can separate poisons from clean images.

Reads a run folder written by `incompat sanitize ... --truth truth.parquet` (its checkpoints/ hold every learner's
core set and probabilities) and ranks all samples by three scores: the held-out p(label) (only learners whose core
set does not hold the sample), the mean p(label) over all learners, and the review score (`attack_score`, the
score `review_order` gives removed samples, applied to every sample). Prints the poison recall when the top of each
ranking is removed until 1%, 5% and 10% of the clean images are gone. No decision rule that thresholds one of these
scores does better than its line.

  .venv/bin/python bench/research/research_ceiling.py runs/s1 --truth data/poisoned/truth.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from incompat.data import read_dataset  # noqa: E402
from incompat.ispl import attack_score, held_out_probabilities  # noqa: E402
from incompat.sanitize import read_truth  # noqa: E402
from ranking import load_learners, recall_at  # noqa: E402


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
