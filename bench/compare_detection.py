"""ISPL+B against the baselines at the same clean-removal budget, from the masks bench_defense.py saved.

`bench_defense.py --checkpoints DIR --methods none,ispl,spectral,ac` leaves, per scenario, ISPL+B's keep-mask and
suspicion score (`<profile>/result.npz`) and the baselines' removal masks (`baselines.npz`). The issue's target is
"ahead of both baselines on poison recall at no more clean removed"; the masks alone compare at different clean
budgets, so this also ranks every sample by ISPL+B's suspicion score and cuts the ranking where it has removed as
many clean images as the baseline did: that recall is what ISPL+B's scores can do at the baseline's budget. The
`@5%` column cuts the same ranking at the target's budget (5% of the clean images removed). The `vote` column is
the share of the poisons the vote did not keep, recomputed from the learner checkpoints with the profile's vote
parameters (params.yaml, `--set` as for the run): with outside judging the refinement removes none of the others,
so no threshold or score can reach a higher recall with these learners.

  .venv/bin/python bench/compare_detection.py bench/results/checkpoints/cifar10-full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from incompat.config import load_params, parse_overrides  # noqa: E402
from incompat.ispl import vote_keep  # noqa: E402
from incompat.metrics import detection_confusion  # noqa: E402
from ranking import load_learners, recall_at  # noqa: E402

BASELINES = ("spectral", "ac", "spectre")
TARGET_CLEAN = 0.05  # the budget: recall >= 99% with at most 5% of the clean images removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a checkpoint folder of one dataset, e.g. .../cifar10-full")
    ap.add_argument("--profile", default=None, help="default: defense.profile of --params")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="defense override key=value, as the run had")
    args = ap.parse_args()
    params = load_params(args.params, profile=args.profile, defense_overrides=parse_overrides(args.set))
    cfg, args.profile = params.defense, params.profile
    rows = []
    for scenario_dir in sorted(p for p in args.root.iterdir() if p.is_dir()):
        result_path, base_path = scenario_dir / args.profile / "result.npz", scenario_dir / "baselines.npz"
        if not (result_path.exists() and base_path.exists()):
            continue
        with np.load(result_path) as res, np.load(base_path) as base:
            poison = res["poison"]
            if not np.array_equal(poison, base["poison"]):
                sys.exit(f"{scenario_dir}: ISPL+B and the baselines saw different poisonings")
            row = {"scenario": scenario_dir.name, "poisons": int(poison.sum()),
                   "ispl": figures(~res["keep"], poison),
                   "at_target": recall_at(res["suspicion"], poison, (TARGET_CLEAN,))[0],
                   "vote": vote_ceiling(scenario_dir / args.profile, res, cfg)}
            for method in BASELINES:
                key = f"removed_{method}"
                if key in base:
                    removed = base[key]
                    recall, clean = figures(removed, poison)
                    ranked = recall_at(res["suspicion"], poison, (clean,))[0]
                    row[method] = (recall, clean, ranked)
        rows.append(row)
    if not rows:
        sys.exit(f"no scenario under {args.root} has both {args.profile}/result.npz and baselines.npz")
    head = f"{'scenario':34} {'poisons':>7}  {'ISPL+B':>15} {f'@{TARGET_CLEAN:.0%}':>6} {'vote':>6}"
    for method in BASELINES:
        head += f"  {method:>15} {'ISPL@budget':>11}"
    print(head + f"\n# recall% / clean-removed%; @{TARGET_CLEAN:.0%}: ISPL+B's ranking cut at {TARGET_CLEAN:.0%} of the clean images removed; "
                 "vote: poisons the vote did not keep (with outside judging, the most the defense can remove); "
                 "ISPL@budget: cut at the baseline's clean budget")
    for row in rows:
        line = f"{row['scenario']:34} {row['poisons']:>7}  {fmt(row['ispl']):>15} {100 * row['at_target']:5.1f}%"
        line += f" {100 * row['vote'][0]:5.1f}%" if row["vote"] is not None else f" {'-':>6}"
        for method in BASELINES:
            if method in row:
                line += f"  {fmt(row[method][:2]):>15} {100 * row[method][2]:10.1f}%"
        print(line)
    print(f"\n# medians over {len(rows)} scenarios")
    print(f"ISPL+B    recall {median(rows, 'ispl', 0):6.1f}%  clean removed {median(rows, 'ispl', 1):5.2f}%  "
          f"ranking at {TARGET_CLEAN:.0%} clean: median recall {median(rows, 'at_target'):5.1f}%, "
          f">= 99% in {sum(r['at_target'] >= 0.99 for r in rows)}/{len(rows)}")
    voted = [r for r in rows if r["vote"] is not None]
    if voted:
        print(f"vote      does not keep a median {median(voted, 'vote', 0):5.1f}% of the poisons "
              f"({100 * min(r['vote'][0] for r in voted):.1f}-{100 * max(r['vote'][0] for r in voted):.1f}%), "
              f">= 99% in {sum(r['vote'][0] >= 0.99 for r in voted)}/{len(voted)}, "
              f"nor a median {median(voted, 'vote', 1):5.2f}% of the clean images")
    for method in BASELINES:
        have = [r for r in rows if method in r]
        if not have:
            continue
        ahead = sum(r["ispl"][0] >= r[method][0] and r["ispl"][1] <= r[method][1] for r in have)
        ahead_ranked = sum(r[method][2] >= r[method][0] for r in have)
        print(f"{method:9} recall {median(have, method, 0):6.1f}%  clean removed {median(have, method, 1):5.2f}%  "
              f"ISPL+B's mask at least its recall at no more clean: {ahead}/{len(have)}; "
              f"ISPL+B's ranking at its clean budget at least its recall: {ahead_ranked}/{len(have)}, "
              f"median recall {median(have, method, 2):5.1f}%")


def vote_ceiling(profile_dir: Path, result, cfg) -> tuple[float, float] | None:
    """Shares of the poisons and of the clean images the vote did not keep; None without learner checkpoints or
    saved labels."""
    learners = load_learners(profile_dir) if "labels" in result else []
    if not learners:
        return None
    labels, poison = result["labels"], result["poison"]
    kept = vote_keep(learners, labels, learners[0].probabilities.shape[1], cfg)
    return float((~kept[poison]).mean()), float((~kept[~poison]).mean())


def figures(removed: np.ndarray, poison: np.ndarray) -> tuple[float, float]:
    """(poison recall, fraction of clean removed)."""
    conf = detection_confusion(removed, poison)
    return conf["recall"], conf["clean_removed_fraction"]


def fmt(pair) -> str:
    return f"{100 * pair[0]:5.1f} / {100 * pair[1]:5.2f}"


def median(rows: list[dict], key: str, index: int | None = None) -> float:
    return 100 * float(np.median([r[key] if index is None else r[key][index] for r in rows]))


if __name__ == "__main__":
    main()
