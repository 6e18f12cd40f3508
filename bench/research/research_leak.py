"""What the poisons the vote lets through cost ISPL+B's refinement.

With outside judging the refinement model trains on the samples the vote trusts (and on those it admits later) and
ranks the rest by p(label). Two things keep that ranking from the bound of `research_clean_judge.py`: the poisons
among what it trains on, and what it trains on being the learners' easy samples rather than a random share of the
data. This separates them on the learners a `bench_defense.py --checkpoints ROOT` run saved: it runs the
profile's refinement on a scratch copy of those learners twice,

  as-is     unchanged (the run's own refinement, recomputed)
  no-leak   ground truth takes every poison out of what the vote trusts and of what the judge admits, so no
            poison ever reaches the judge's training set (a diagnostic, not a defense)

and prints the poison recall of each ranking cut at 1%, 5% and 10% of the clean images removed, and what each
mask removes. The gap between the two lines is what the leaked poisons cost; the gap between no-leak and the
`clean` judge of `research_clean_judge.py` is what training on the learners' easy samples costs.

  .venv/bin/python bench/research/research_leak.py bench/results/checkpoints --scenarios paper:100:17,paper:100:0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "research"))

from incompat import ispl  # noqa: E402
from incompat.config import load_params, parse_overrides  # noqa: E402
from research_ceiling import recall_at  # noqa: E402
from research_ispl import load  # noqa: E402


def refine(train, cfg, learner_dir: Path, poison: np.ndarray | None) -> ispl.DefenseResult:
    """The profile's defense on a scratch copy of learner_dir's learners (their refinement is redone); with
    `poison`, no poison is ever trusted, so none is trained on."""
    with tempfile.TemporaryDirectory(prefix="research-leak-") as scratch:
        for path in learner_dir.glob("learner-*"):
            shutil.copy(path, scratch)
        for name in ("fingerprint.txt", "meter.json"):
            if (learner_dir / name).exists():
                shutil.copy(learner_dir / name, scratch)
        # Patching a name run_defense no longer calls would silently measure as-is twice.
        vote_keep, trusted = ispl.vote_keep, ispl._trusted
        assert {"vote_keep", "_trusted"} <= set(ispl.run_defense.__code__.co_names), "run_defense changed"
        if poison is not None:
            # The engine never reads ground truth; this research-only patch of its two trust decisions does.
            ispl.vote_keep = lambda *a, **k: vote_keep(*a, **k) & ~poison
            ispl._trusted = lambda *a, **k: trusted(*a, **k) & ~poison
        try:
            result = ispl.run_defense(train.images, train.labels, train.n_classes, cfg, checkpoint_dir=scratch,
                                      fingerprint=train.dataset_digest())
        finally:
            ispl.vote_keep, ispl._trusted = vote_keep, trusted
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the --checkpoints folder of a bench_defense.py run")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--scenarios", default="paper:100:17")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="defense override key=value, as the run had")
    ap.add_argument("--modes", default="as-is,no-leak")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - {"as-is", "no-leak"}:
        ap.error(f"--modes: unknown {sorted(unknown)} (as-is, no-leak)")
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    overrides.setdefault("learner_train", {})["threads"] = args.threads
    cfg = load_params(args.params, profile=args.profile, defense_overrides=overrides).defense
    print(f"{'scenario':36} {'mode':8} {'@1%':>7} {'@5%':>7} {'@10%':>7} {'mask recall / clean':>20} {'seconds':>8}")
    for spec in args.scenarios.split(","):
        train, poison, scenario = load(args.dataset, None, spec)
        learner_dir = args.root / f"{args.dataset}-full" / scenario.name / args.profile
        if not any(learner_dir.glob("learner-*.npz")):
            sys.exit(f"{learner_dir}: no learner checkpoints (run bench_defense.py --checkpoints {args.root} first)")
        marker = learner_dir / "fingerprint.txt"
        if not marker.exists() or marker.read_text() != ispl.learner_fingerprint(cfg, train.dataset_digest()):
            # run_defense would discard them and train new learners: minutes of work that answer another question.
            sys.exit(f"{learner_dir}: its learners were saved with other parameters (pass the run's --set)")
        for mode in modes:
            t0 = time.monotonic()
            result = refine(train, cfg, learner_dir, poison if mode == "no-leak" else None)
            removed = ~result.keep_mask
            r1, r5, r10 = recall_at(result.suspicion, poison)
            mask = f"{removed[poison].mean():.1%} / {removed[~poison].mean():.2%}"
            print(f"{scenario.name:36} {mode:8} {r1:7.1%} {r5:7.1%} {r10:7.1%} {mask:>20} "
                  f"{time.monotonic() - t0:8.0f}", flush=True)


if __name__ == "__main__":
    main()
