"""Offline study: self-paced cross-fitted refinement. Judges train on the trusted set (held-out EMA p(label) >=
train_thr), every sample is judged only by the fold model that did not train on it; remove = EMA < final_thr.
Ground truth only for printing."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "research"))

from research_ispl import load  # noqa: E402
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit, predict_logits  # noqa: E402


def report(tag, ema, labels, mask, tgt):
    n = len(labels)
    pl = ema[np.arange(n), labels]
    auc = roc_auc_score(mask, -pl)
    parts = [f"{tag} AUC {auc:.3f}"]
    for thr in (0.02, 0.05, 0.1, 0.2, 0.3):
        rm = pl < thr
        parts.append(f"<{thr}: rec {rm[mask].mean():.2f} cl {100 * rm[~mask].mean():.1f}%")
    print(" | ".join(parts), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--subset", type=int, default=0)
    ap.add_argument("--scenario", default="paper:100:2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--train-thr", type=float, default=0.1)
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--ls", type=float, default=0.1)
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, mask, sc = load(args.dataset, args.subset or None, args.scenario)
    labels, k, n = train.labels, train.n_classes, len(train.labels)
    print(f"## {sc.name} n={n} poisons={mask.sum()} {vars(args)}", flush=True)
    data = TensorData(train.images, labels, num_classes=k)
    fold = np.random.default_rng(0).integers(0, args.folds, n)
    trusted = np.ones(n, bool)
    meter = ComputeMeter()
    models = [None] * args.folds
    ema = None
    t0 = time.monotonic()
    base = TrainConfig(model="small_cnn", batch_size=256, lr=0.2, schedule="onecycle", warmup=0.2, threads=1,
                       epochs=args.epochs, label_smoothing=args.ls)
    for it in range(args.rounds):
        p = np.zeros((n, k), np.float32)
        for f in range(args.folds):
            idx = np.flatnonzero(trusted & (fold != f))
            cfg = dataclasses.replace(base, seed=100 * it + f)
            models[f] = fit(data, cfg, indices=idx, model=None if args.fresh else models[f], meter=meter,
                            progress=False)
            judge = np.flatnonzero(fold == f)
            p[judge] = torch.softmax(predict_logits(models[f], data, judge, meter=meter), 1).numpy()
        ema = p if ema is None else args.decay * ema + (1 - args.decay) * p
        acc = (p.argmax(1)[~mask] == labels[~mask]).mean()
        report(f"round {it} trusted {trusted.sum()} (poison {trusted[mask].sum()}) acc-ho {acc:.3f} "
               f"t={time.monotonic() - t0:.0f}s ep-eq {meter.epoch_equivalents(n):.1f}", ema, labels, mask, sc.target)
        report("   (this round only)", p, labels, mask, sc.target)
        trusted = ema[np.arange(n), labels] >= args.train_thr
        if args.save:
            np.savez(args.save, p=p, ema=ema, fold=fold, mask=mask, labels=labels, src=sc.source, tgt=sc.target)


if __name__ == "__main__":
    main()
