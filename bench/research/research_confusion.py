"""Research: does confusion training find learned-trigger poisons? (issue 23)

Pretrain on everything for a few epochs, then train on (everything) + (a reserve drawn at random, each copy with
a random label): the reserve's random labels stop the model from fitting benign features, a trigger the reserve
does not carry is still fitted. Score = p(label) of the confused model; recall at fixed clean-removed budgets.

  .venv/bin/python bench/research/research_confusion.py cifar10 paper:100:2 --subset 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import load_split, scenario_list  # noqa: E402
from incompat.attacks import load_scenario_yaml, poison  # noqa: E402
from incompat.readers import subsample_stratified  # noqa: E402
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit, predict_logits  # noqa: E402


def recall_at(score, poison_mask, budgets=(0.01, 0.02, 0.05, 0.1)):
    clean = np.sort(score[~poison_mask])[::-1]
    out = {}
    for b in budgets:
        thr = clean[int(b * len(clean))]
        out[b] = float((score[poison_mask] > thr).mean())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--subset", type=int)
    ap.add_argument("--pre", type=int, default=2)
    ap.add_argument("--conf", type=int, default=3)
    ap.add_argument("--reserve", type=float, default=0.05)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--flip", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    full = load_split(args.dataset, "train", ROOT / "bench" / "results" / "cache")
    base = subsample_stratified(full, args.subset, seed=0) if args.subset else full
    specs = args.scenarios.split("+")
    for spec in specs:
        scen = [load_scenario_yaml(spec)] if spec.endswith(".yaml") else scenario_list(spec)
        for sc in scen:
            t0 = time.monotonic()
            train, pm = poison(base, sc)
            n, k = len(train), train.n_classes
            rng = np.random.default_rng(0)
            reserve = rng.choice(n, int(args.reserve * n), replace=False)
            imgs = np.concatenate([train.images] + [train.images[reserve]] * args.copies)
            labs = np.concatenate([train.labels] + [rng.integers(0, k, len(reserve)) for _ in range(args.copies)])
            data = TensorData(imgs, labs, num_classes=k)
            meter = ComputeMeter()
            cfg = TrainConfig(epochs=args.pre, lr=0.2, flip=bool(args.flip), label_smoothing=0.0)
            model = fit(data, cfg, np.arange(n), meter=meter, progress=False)
            p_pre = torch.softmax(predict_logits(model, data, np.arange(n)), 1).numpy()[np.arange(n), train.labels]
            cfg2 = TrainConfig(epochs=args.conf, lr=args.lr, flip=bool(args.flip), label_smoothing=0.0,
                               schedule="constant", warmup=0.0)
            model = fit(data, cfg2, np.arange(len(labs)), model=model, meter=meter, progress=False)
            p = torch.softmax(predict_logits(model, data, np.arange(n)), 1).numpy()[np.arange(n), train.labels]
            ee = meter.epoch_equivalents(n)
            r0 = recall_at(p_pre, pm)
            r = recall_at(p, pm)
            src = train.labels == sc.source if hasattr(sc, "source") else None
            print(f"{sc.name:32} poisons {pm.sum():4} pre recall@1/2/5/10% "
                  + "/".join(f"{100*v:.0f}" for v in r0.values())
                  + " conf " + "/".join(f"{100*v:.0f}" for v in r.values())
                  + f" median p poison {np.median(p[pm]):.2f} clean {np.median(p[~pm]):.2f}"
                  + f" frac clean p>0.5 {np.mean(p[~pm] > 0.5):.3f} poison {np.mean(p[pm] > 0.5):.3f}"
                  + f" ep-eq {ee:.1f} {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
