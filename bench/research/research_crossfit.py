"""Offline study of a cross-fitted refinement + anomalous-cell keep rule (ground truth only for printing)."""
from __future__ import annotations

import argparse
import dataclasses
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


def anomalous_cells(p, labels, n_classes, z_min, ratio):
    win = p.argmax(1)
    conf = np.zeros((n_classes, n_classes))
    np.add.at(conf, (labels, win), 1)
    nc = np.bincount(labels, minlength=n_classes).astype(float)
    exp = conf.T * (nc[:, None] / np.maximum(nc[None, :], 1))
    z = (conf - exp) / np.sqrt(exp + 1)
    np.fill_diagonal(z, -np.inf)
    cells = (z > z_min) & (conf > ratio * exp)
    return cells, z, conf


def rules(p, labels, mask, k, src, tgt):
    out = {}
    win = p.argmax(1)
    pl = p[np.arange(len(labels)), labels]
    for z_min, ratio in ((3, 1.5), (5, 2.0)):
        cells, z, conf = anomalous_cells(p, labels, k, z_min, ratio)
        bad_t = cells.any(1)
        in_cell = cells[labels, win]
        out[f"cell z{z_min}"] = in_cell
        out[f"cls z{z_min}"] = bad_t[labels] & (win != labels)
        # margin rule inside the anomalous cell's label: p(s) > 0.5 * p(t) for some anomalous s
        ps = (p * cells[labels]).max(1)
        out[f"mrg z{z_min}"] = bad_t[labels] & (ps > 0.5 * pl)
        if z_min == 3:
            out["_cells"] = [(a, b, round(z[a, b], 1), int(conf[a, b])) for a, b in zip(*np.nonzero(cells))]
    out["wrong"] = win != labels
    return out


def show(tag, p, labels, mask, k, src, tgt):
    r = rules(p, labels, mask, k, src, tgt)
    cells = r.pop("_cells")
    acc = (p.argmax(1)[~mask] == labels[~mask]).mean()
    s = f"{tag}: acc-ho {acc:.3f} cells {cells} | "
    s += " | ".join(f"{name} rec {100 * rm[mask].mean():.0f} cl {100 * rm[~mask].mean():.1f}"
                    for name, rm in r.items())
    print(s, flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--scenario", default="paper:100:2")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--init", default="all")  # all | path to keep .npy
    ap.add_argument("--fresh", action="store_true", help="fresh models each round")
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--rule", default="cls z3")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, mask, sc = load(args.dataset, args.subset or None, args.scenario)
    labels, k, n = train.labels, train.n_classes, len(train.labels)
    data = TensorData(train.images, labels, num_classes=k)
    rng = np.random.default_rng(0)
    fold = rng.integers(0, args.folds, n)
    keep = np.ones(n, bool) if args.init == "all" else (~mask if args.init == "oracle" else np.load(args.init))
    meter = ComputeMeter()
    models = [None] * args.folds
    p_ema = None
    t0 = time.monotonic()
    base = TrainConfig(model="small_cnn", batch_size=256, lr=args.lr, schedule="onecycle", warmup=0.2,
                       threads=1, epochs=args.epochs)
    for it in range(args.rounds):
        p = np.zeros((n, k), np.float32)
        for f in range(args.folds):
            idx = np.flatnonzero(keep & (fold != f))
            cfg = dataclasses.replace(base, seed=100 * it + f)
            models[f] = fit(data, cfg, indices=idx, model=None if args.fresh else models[f], meter=meter,
                            progress=False)
            judge = np.flatnonzero(fold == f)
            p[judge] = torch.softmax(predict_logits(models[f], data, judge, meter=meter), 1).numpy()
        p_ema = p if p_ema is None else args.decay * p_ema + (1 - args.decay) * p
        r = show(f"round {it} kept {keep.sum()} ({100 * keep[~mask].mean():.1f}% clean, poison {keep[mask].sum()})"
                 f" t={time.monotonic() - t0:.0f}s ep-eq {meter.epoch_equivalents(n):.1f}",
                 p_ema, labels, mask, k, sc.source, sc.target)
        keep = ~r[args.rule]
        if args.save:
            np.savez(args.save, p=p, p_ema=p_ema, fold=fold, mask=mask, labels=labels, src=sc.source, tgt=sc.target)


if __name__ == "__main__":
    main()
