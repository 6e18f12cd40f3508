"""The attack success rate a model shows with no poison at all: the floor no filter can go below.

ASR counts the triggered source-class test images that the model calls the target class. A model that never saw a
poison still calls some of them the target, by natural confusion (a weak model confuses cats with dogs whatever the
trigger). This trains one model on the unpoisoned training set, with the retraining recipe of params.yaml (as the
oracle and every defense's retraining use it), and evaluates it on each scenario's triggered test set: that ASR is
about what the oracle (trained on the truly clean part of a poisoned set) can reach, for every scenario at the
cost of one training. A scenario whose floor is above 1% cannot meet "ASR <= 1%" with this model, whatever
the defense removes.

  .venv/bin/python bench/natural_asr.py --scenarios paper:100:0-23 --csv bench/results/natural-asr.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import load_split, scenario_list  # noqa: E402
from incompat.attacks import triggered_test  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.evaluation import evaluate  # noqa: E402
from incompat.readers import subsample_stratified  # noqa: E402
from incompat.training import TensorData, fit  # noqa: E402

FIELDS = ["dataset", "scenario", "source", "target", "clean_accuracy", "natural_asr", "natural_tmr"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    ap.add_argument("--scenarios", default="paper:100:0-23")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--csv", default=None)
    ap.add_argument("--subset", type=int, default=None, help="stratified subset of the training set")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_cfg = load_params(args.params).train
    if args.threads:
        train_cfg = dataclasses.replace(train_cfg, threads=args.threads)
    cache = ROOT / "bench" / "results" / "cache"
    train, test = load_split(args.dataset, "train", cache), load_split(args.dataset, "test", cache)
    if args.subset:
        train = subsample_stratified(train, args.subset, seed=0)
    # One TensorData for the training and every evaluation: the test sets reuse its normalisation statistics
    # (train_and_evaluate's steps, kept apart so that one trained model serves every scenario).
    train_data = TensorData(train.images, train.labels, num_classes=train.n_classes)
    t0 = time.monotonic()
    model = fit(train_data, train_cfg, progress=False)
    clean = evaluate(model, train_data, test, None, None, len(train))
    print(f"# clean model: {len(train)} images, {train_cfg.epochs} epochs, {time.monotonic() - t0:.0f} s, "
          f"test accuracy {100 * clean.clean_accuracy:.2f}%", flush=True)
    rows = []
    for scenario in scenario_list(args.scenarios):
        ev = evaluate(model, train_data, test, triggered_test(test, scenario), scenario.target, len(train))
        rows.append({"dataset": args.dataset, "scenario": scenario.name, "source": scenario.source,
                     "target": scenario.target, "clean_accuracy": round(100 * ev.clean_accuracy, 2),
                     "natural_asr": round(100 * ev.attack_success_rate, 2),
                     "natural_tmr": round(100 * ev.targeted_misclassification, 2)})
        print(f"{scenario.name:36} ASR {rows[-1]['natural_asr']:6.2f}%  TMR {rows[-1]['natural_tmr']:5.2f}%",
              flush=True)
    floor_ok = sum(r["natural_asr"] <= 1.0 for r in rows)
    print(f"\n# {floor_ok} of {len(rows)} scenarios have a natural ASR <= 1% (median "
          f"{np.median([r['natural_asr'] for r in rows]):.2f}%)")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
