"""Offline study: the compatibility test among suspects. Suspects (held-out p(label) < tau from a research_ispl
run) are split in two; a model trained on one half plus a random sample of non-suspects judges the other half.
Poisons share a trigger, so they make each other fittable; hard clean suspects are idiosyncratic. Prints the
separation (ground truth only for printing).

  .venv/bin/python bench/research/research_suspects.py --subset 10000 --scenario paper:100:7 --ckpt 2d81cbedf5
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
sys.path.insert(0, str(ROOT / "bench" / "research"))

from research_ispl import load  # noqa: E402
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit, predict_logits  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--scenario", default="paper:100:7")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--others", type=float, default=1.0, help="non-suspects per suspect in each training set")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--augment", type=int, default=1)
    args = ap.parse_args()
    train, mask, sc = load(args.dataset, args.subset or None, args.scenario)
    labels, n = train.labels, len(train.labels)
    p_ho = np.load(ROOT / "bench" / "results" / "research" / args.ckpt / "p_ho.npy")
    pl = p_ho[np.arange(n), labels]
    suspect = pl < args.tau
    print(f"suspects {suspect.sum()} ({suspect.mean():.1%}), "
          f"poisons among them {(suspect & mask).sum()}/{mask.sum()}")
    rng = np.random.default_rng(0)
    data = TensorData(train.images, labels, num_classes=train.n_classes)
    meter = ComputeMeter()
    s_idx = np.flatnonzero(suspect)
    fold = rng.integers(0, args.folds, len(s_idx))
    others = np.flatnonzero(~suspect)
    judged = np.zeros((n, train.n_classes), dtype=np.float32)
    t0 = time.monotonic()
    for f in range(args.folds):
        tr_s = s_idx[fold != f]
        r = rng.choice(others, min(len(others), int(args.others * len(tr_s))), replace=False)
        cfg = TrainConfig(epochs=args.epochs, seed=f, augment=bool(args.augment))
        model = fit(data, cfg, indices=np.concatenate([tr_s, r]), meter=meter, progress=False)
        jd = s_idx[fold == f]
        judged[jd] = torch.softmax(predict_logits(model, data, jd, meter=meter), 1).numpy()
    score = judged[np.arange(n), labels]
    print(f"trained in {time.monotonic() - t0:.0f}s, {meter.epoch_equivalents(n):.2f} ep-eq")
    sp, sc_ = score[suspect & mask], score[suspect & ~mask]
    q = lambda a, v: np.quantile(a, v) if len(a) else float("nan")  # noqa: E731
    print(f"poison suspects p(label) q10/50/90 {q(sp, .1):.3f}/{q(sp, .5):.3f}/{q(sp, .9):.3f}; clean suspects "
          f"q50/90/99 {q(sc_, .5):.3f}/{q(sc_, .9):.3f}/{q(sc_, .99):.3f}")
    tgt = labels == sc.target
    for thr in (0.2, 0.3, 0.5, 0.7):
        hit = suspect & (score > thr)
        print(f"  p>{thr}: poisons {int((hit & mask).sum())} clean {int((hit & ~mask).sum())} "
              f"(in target class {int((hit & ~mask & tgt).sum())})")
    # within the target class only: how do poisons rank among the target class's suspects?
    st = suspect & tgt
    order = np.argsort(-score[st])
    ranks = np.flatnonzero(mask[st][order])
    print(f"target-class suspects {st.sum()}; poison ranks (of {len(ranks)}): median {np.median(ranks):.0f}, "
          f"90% {np.quantile(ranks, .9):.0f}" if len(ranks) else "no poison suspects")
    np.save(ROOT / "bench" / "results" / "research" / args.ckpt / "suspect_score.npy", score)


if __name__ == "__main__":
    main()
