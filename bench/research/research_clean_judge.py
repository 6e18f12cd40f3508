"""What an outside judge could do if nothing it trained on were poisoned: the bound of ISPL+B's refinement.

With outside judging, ISPL+B's refinement model trains on the samples it trusts and ranks the others by p(label).
Two things limit that ranking: poisons that slip into its training set (it then learns their labels) and the
judge's own accuracy (a weak model gives many clean images a low p(label) too). This separates the two. The
samples are split into two seeded folds; for each fold a judge of the profile's model is trained on the other
fold, and judges its fold:

  clean     trains only on the truly clean samples of the other fold (a judge no poison reached; ground truth
            picks them, so this is a bound, not a defense)
  all       trains on every sample of the other fold, poisons included (a judge that trusts everything)

and prints the poison recall with the ranking cut at 1%, 5% and 10% of the clean images removed. If `clean`
falls short of the target, no choice of what to trust reaches it with this model and training length.

Then the same judgments through the anomalous-cell test (`incompat.ispl.cross_fit_keep` with the profile given
by `--cell-profile`, cpu_crossfit by default): the keep rule's recall / clean removed, and the ranking with the
samples of flagged cells first. This asks whether a rule that looks for one over-filled (label, predicted) cell
gets past the p(label) bound. `--save FILE.npz` keeps the judged probabilities for more offline rules.

  .venv/bin/python bench/research/research_clean_judge.py --scenario paper:100:17 --epochs 6
  .venv/bin/python bench/research/research_clean_judge.py --profile cpu_trigger --judges clean --csv FILE.csv
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "research"))

from incompat.config import load_params, parse_overrides  # noqa: E402
from incompat.ispl import cross_fit_keep, flagged_cells  # noqa: E402
from incompat.training import TensorData, fit, predict_logits  # noqa: E402
from research_ceiling import recall_at  # noqa: E402
from research_ispl import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--scenario", default="paper:100:17")
    ap.add_argument("--profile", default=None,
                    help="a name under defense_profiles (default: defense.profile of --params)")
    ap.add_argument("--epochs", type=int, default=6, help="the judge's epochs (cpu: 3 rounds of 2)")
    ap.add_argument("--judges", default="clean,all")
    ap.add_argument("--flip", action="store_true", help="also average each judge's p over the mirrored image")
    ap.add_argument("--loss-trim", type=float, default=0.0, help="the judge's TrainConfig.loss_trim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cell-profile", default="cpu_crossfit", help="the profile whose keep rule is applied")
    ap.add_argument("--save", type=Path, default=None, help="write the judged probabilities (and truth) here")
    ap.add_argument("--csv", type=Path, default=None,
                    help="append one row per judge (scenario, accuracy, recall at 1/5/10%% clean) to this CSV")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[],
                    help="defense override key=value, as bench_defense.py's (e.g. the learners' flip_pairs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params, profile=args.profile, defense_overrides=parse_overrides(args.set)).defense
    rule = load_params(args.params, profile=args.cell_profile).defense
    train, poison, scenario = load(args.dataset, args.subset, args.scenario)
    labels = np.asarray(train.labels, dtype=np.int64)
    n = len(labels)
    data = TensorData(train.images, labels, num_classes=train.n_classes)
    fold = np.random.default_rng(0).integers(0, 2, n)
    train_cfg = dataclasses.replace(cfg.learner_train, epochs=args.epochs, threads=args.threads, seed=0,
                                    loss_trim=args.loss_trim)
    print(f"# {scenario.name}: {n} samples, {int(poison.sum())} poisons; judge {train_cfg.model}, "
          f"{args.epochs} epochs, loss_trim {args.loss_trim}, 2 folds")
    print(f"{'judge':12} {'acc(clean)':>10} {'@1%':>7} {'@5%':>7} {'@10%':>7} {'seconds':>8}   "
          f"{args.cell_profile}'s keep rule: recall / clean removed, flagged cells; cells-first ranking @1/5/10%")
    saved = {"labels": labels, "poison": poison}
    for kind in args.judges.split(","):
        t0 = time.monotonic()
        probs = np.zeros((n, train.n_classes))
        flipped = np.zeros((n, train.n_classes))
        for f in (0, 1):
            trusted = (fold != f) & (~poison if kind == "clean" else True)
            model = fit(data, train_cfg, np.flatnonzero(trusted), progress=False)
            judged = np.flatnonzero(fold == f)
            probs[judged] = torch.softmax(predict_logits(model, data, judged).float(), 1).numpy()
            if args.flip:
                mirrored = TensorData(train.images[judged][:, :, ::-1].copy(), labels[judged],
                                      num_classes=train.n_classes, mean=data.mean, std=data.std)
                flipped[judged] = torch.softmax(predict_logits(model, mirrored).float(), 1).numpy()
        variants = {kind: probs}
        if args.flip:
            variants[kind + "+flip"] = (probs + flipped) / 2
        for name, p in variants.items():
            p_label = p[np.arange(n), labels]
            accuracy = float((p.argmax(1) == labels)[~poison].mean())
            r1, r5, r10 = recall_at(1.0 - p_label, poison)
            removed = ~cross_fit_keep(p, labels, train.n_classes, rule)
            cells, in_cell = flagged_cells(p, labels, train.n_classes, rule)
            c1, c5, c10 = recall_at(1.0 - p_label + in_cell * (p_label < rule.anomaly_threshold), poison)
            flagged = [f"{t}<-{s}" for t, s in zip(*np.nonzero(cells))]
            print(f"{name:12} {accuracy:10.1%} {r1:7.1%} {r5:7.1%} {r10:7.1%} {time.monotonic() - t0:8.0f}   "
                  f"{removed[poison].mean():.1%} / {removed[~poison].mean():.2%}, {flagged}; "
                  f"{c1:.1%} {c5:.1%} {c10:.1%}", flush=True)
            saved[name] = p.astype(np.float32)
            if args.csv:
                write_header = not args.csv.exists() or args.csv.stat().st_size == 0
                with open(args.csv, "a", newline="", encoding="utf-8") as fh:
                    out = csv.writer(fh)
                    if write_header:
                        out.writerow(["scenario", "judge", "epochs", "accuracy_pct", "recall_at_1pct_clean",
                                      "recall_at_5pct_clean", "recall_at_10pct_clean", "seconds"])
                    out.writerow([scenario.name, name, args.epochs, round(100 * accuracy, 2), round(100 * r1, 2),
                                  round(100 * r5, 2), round(100 * r10, 2), round(time.monotonic() - t0)])
    if args.save:
        np.savez_compressed(args.save, **saved)


if __name__ == "__main__":
    main()
