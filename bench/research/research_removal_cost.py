"""What the clean images ISPL+B removes cost the retrained model, against the same number removed at random.

On CIFAR-10 the default removes about 5% of the clean images and its retraining lands 1-2 points below the oracle
(the model trained on the truly clean set). This separates what that costs from seed spread, from the poisons it
keeps, and from which clean images it picks, by retraining the final model (params.yaml `train`) on:

  oracle           every clean image (the benchmark's oracle)
  kept             ISPL+B's keep-mask (the benchmark's `ispl` row)
  clean-removed    every clean image but the ones ISPL+B removed (its poison misses no longer count)
  clean-random     every clean image but as many, drawn at random
  cut@P            ISPL+B's suspicion ranking cut where it has removed P% of the clean images (poisons it ranks
                   below the cut stay in)
  thr@T            the keep rule at refinement_threshold T (one of `--thresholds`)

each with every seed of `--seeds`, from a `bench_defense.py --checkpoints` folder's `result.npz`. It first prints
where the defense's epoch-equivalents went (trigger stage, weak learner, refinement), from the checkpoints' meters,
and, with `--thresholds`, the keep rule's recall and clean removal at other `refinement_threshold`s, recomputed from
the refinement's saved judgments: exact, because a sample under the default's threshold is never trusted (p(label) <
`refinement_train_threshold`), so the rounds would have trained on the same samples.

  .venv/bin/python bench/research/research_removal_cost.py CKPT/cifar10-full/SCENARIO --scenario paper:100:12
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import load_split, scenario_list  # noqa: E402
from ranking import removed_at  # noqa: E402
from incompat.attacks import poison, triggered_test  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.evaluation import train_and_evaluate  # noqa: E402
from incompat.ispl import cross_fit_keep, draw_suspects  # noqa: E402
from incompat.training import ComputeMeter, TensorData, predict  # noqa: E402


def stage_costs(folder: Path, refinement: dict, n: int) -> str:
    """Epoch-equivalents per stage: each checkpoint's meter is the running total when that stage ended."""
    totals = [("trigger stage", json.loads((folder / "trigger.json").read_text())["meter"])]
    totals += [("weak learner", json.loads(f.read_text())["meter"]) for f in sorted(folder.glob("learner-*.json"))]
    totals.append(("refinement", json.loads(refinement["meter"])))
    parts, before = [], 0.0
    for name, meter in totals:
        total = ComputeMeter(**meter).epoch_equivalents(n)
        parts.append(f"{name} {total - before:.2f}")
        before = total
    return f"# defense cost by stage (epoch-equivalents): {', '.join(parts)}; total {before:.2f}"


def threshold_curve(folder: Path, refinement: dict, labels: np.ndarray, poison_mask: np.ndarray, keep: np.ndarray,
                    cfg, thresholds: list[float]) -> dict[str, np.ndarray]:
    """The keep-masks at other refinement thresholds, as arms named thr@VALUE; prints their detection figures."""
    probs = refinement["probs"].numpy()
    n_classes = probs.shape[1]
    with np.load(folder / "trigger.npz") as z:
        suspects, _ = draw_suspects(z["scores"], z["minor"].astype(bool), z["silhouette"], labels, n_classes, cfg)
    if not np.array_equal(cross_fit_keep(probs, labels, n_classes, cfg, suspects), keep):
        sys.exit(f"{folder}: the keep rule on the saved judgments is not the saved keep-mask")
    masks = {}
    for threshold in thresholds:
        masks[f"thr@{threshold:g}"] = cross_fit_keep(probs, labels, n_classes,
                                                     dataclasses.replace(cfg, refinement_threshold=threshold),
                                                     suspects)
        removed = ~masks[f"thr@{threshold:g}"]
        print(f"# refinement_threshold {threshold:g}: recall {100 * removed[poison_mask].mean():.1f}%, "
              f"clean removed {100 * removed[~poison_mask].mean():.2f}%")
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a scenario's folder of bench_defense.py --checkpoints")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--scenario", required=True, help="the scenario spec the checkpoint was made with")
    ap.add_argument("--profile", default="cpu_trigger")
    ap.add_argument("--arms", default="oracle,kept,clean-removed,clean-random")
    ap.add_argument("--cuts", default="", help="clean-removal percentages to cut the ranking at, e.g. 1,2.5")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--thresholds", default="", help="refinement_threshold values to recompute the keep rule at")
    ap.add_argument("--csv", type=Path, default=None, help="append one row per (arm, seed)")
    ap.add_argument("--per-class", action="store_true", help="also print each arm's test accuracy per class")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    params = load_params(args.params, profile=args.profile)
    train_cfg = params.train
    cache = ROOT / "bench" / "results" / "cache"
    (scenario,) = scenario_list(args.scenario)
    train, poison_mask = poison(load_split(args.dataset, "train", cache), scenario)
    test = load_split(args.dataset, "test", cache)
    test_trig = triggered_test(test, scenario)
    folder = args.checkpoint / args.profile
    with np.load(folder / "result.npz") as res:
        keep, suspicion = res["keep"], res["suspicion"]
        if not np.array_equal(res["poison"], poison_mask):
            sys.exit(f"{args.checkpoint}: its poisons are not those of {args.scenario}")
    clean = ~poison_mask
    removed_clean = clean & ~keep
    rng = np.random.default_rng(0)
    random_out = np.zeros(len(clean), dtype=bool)
    random_out[rng.choice(np.flatnonzero(clean), int(removed_clean.sum()), replace=False)] = True
    masks = {"oracle": clean, "kept": keep, "clean-removed": clean & ~removed_clean,
             "clean-random": clean & ~random_out}
    arms = [a for a in args.arms.split(",") if a]
    for p in (float(v) for v in args.cuts.split(",") if v):
        masks[f"cut@{p:g}"] = ~removed_at(suspicion, poison_mask, p / 100)
        arms.append(f"cut@{p:g}")
    print(f"# {scenario.name}: {len(clean)} images, {int(poison_mask.sum())} poisons; ISPL+B removed "
          f"{int((poison_mask & ~keep).sum())} poisons and {int(removed_clean.sum())} clean images")
    refinement = torch.load(folder / "refinement.pt", weights_only=True)
    print(stage_costs(folder, refinement, len(clean)))
    if args.thresholds:
        masks.update(threshold_curve(folder, refinement, np.asarray(train.labels), poison_mask, keep,
                                     params.defense, [float(v) for v in args.thresholds.split(",")]))
    stats = TensorData(train.images, train.labels, num_classes=train.n_classes)  # the statistics evaluate() uses
    test_data = TensorData(test.images, test.labels, mean=stats.mean, std=stats.std, num_classes=train.n_classes)
    print(f"{'arm':14} {'seed':>4} {'poisons in':>10} {'clean out':>9} {'acc':>6} {'TMR':>6} {'seconds':>7}")
    writer = None
    if args.csv:
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        fh = open(args.csv, "a", newline="")  # closed at exit; each row is flushed as it is written
        writer = csv.writer(fh)
        if new:
            writer.writerow(["scenario", "arm", "seed", "poisons_in", "clean_out", "acc", "tmr", "seconds"])
    for arm in arms:
        mask = masks[arm]
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.monotonic()
            ev = train_and_evaluate(train, test, dataclasses.replace(train_cfg, seed=seed), np.flatnonzero(mask),
                                    test_triggered=test_trig, target=scenario.target)
            row = [scenario.name, arm, seed, int((mask & poison_mask).sum()), int((clean & ~mask).sum()),
                   round(100 * ev.clean_accuracy, 2), round(100 * ev.targeted_misclassification, 2),
                   round(time.monotonic() - t0, 1)]
            print(f"{arm:14} {seed:>4} {row[3]:>10} {row[4]:>9} {row[5]:>6.2f} {row[6]:>6.2f} {row[7]:>7.1f}",
                  flush=True)
            if args.per_class:
                right = predict(ev.model, test_data) == np.asarray(test.labels)
                per_class = np.bincount(test.labels, weights=right, minlength=train.n_classes) / np.bincount(
                    test.labels, minlength=train.n_classes)
                print(f"# {arm} seed {seed} accuracy per class: " + " ".join(f"{100 * a:.1f}" for a in per_class))
            if writer:
                writer.writerow(row)
                fh.flush()


if __name__ == "__main__":
    main()
