"""Offline study: judges that see a 3x3 median-filtered view of every image. The filter erases one-pixel-wide
triggers (pixel, ell, pattern) and keeps the shapes a class is recognised by, so a judge trained on that view
cannot learn such a trigger from the poisons it trains on: a learned-trigger poison then looks like a mislabelled
image of its source class, which the label-disagreement verdict removes. Two-fold cross-fitted judges on the raw
and the filtered view; prints per view the recall of the p(label) ranking at 1/5% of the clean images removed, the
mask at p(label) < 0.005, the judges' clean test accuracy and the triggered test images they call the target.

  .venv/bin/python bench/research/research_median_view.py cifar10 paper:100:10,paper:100:15 --epochs 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_defense import load_split, scenario_list  # noqa: E402
from ranking import recall_at  # noqa: E402
from incompat.attacks import poison, triggered_test  # noqa: E402
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit, predict_logits  # noqa: E402


def median3(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-channel 3x3 median of (N, H, W, C) uint8 images, edges replicated."""
    out = np.empty_like(images)
    for lo in range(0, len(images), chunk):
        x = torch.from_numpy(images[lo:lo + chunk]).permute(0, 3, 1, 2).float()
        n, c, h, w = x.shape
        patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # (n, c*9, h*w)
        med = patches.view(n, c, 9, h * w).median(dim=2).values.view(n, c, h, w)
        out[lo:lo + chunk] = med.permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return out


def cross_fit(images, labels, n_classes, test_images, test_labels, trig_images, target, epochs, folds, seed,
              threads=None):
    data = TensorData(images, labels, num_classes=n_classes)
    test = TensorData(test_images, test_labels, mean=data.mean, std=data.std, num_classes=n_classes)
    trig = TensorData(trig_images, np.full(len(trig_images), target), mean=data.mean, std=data.std,
                      num_classes=n_classes)
    fold = np.random.default_rng(seed).integers(0, folds, len(labels))
    p = np.zeros(len(labels))
    acc, hit = [], []
    meter = ComputeMeter()
    for f in range(folds):
        model = fit(data, TrainConfig(epochs=epochs, seed=seed + f, threads=threads), indices=np.flatnonzero(fold != f),
                    meter=meter, progress=False)
        out = np.flatnonzero(fold == f)
        p[out] = torch.softmax(predict_logits(model, data, out), 1).numpy()[np.arange(len(out)), labels[out]]
        acc.append(float((predict_logits(model, test).argmax(1).numpy() == test_labels).mean()))
        hit.append(float((predict_logits(model, trig).argmax(1).numpy() == target).mean()))
    return p, float(np.mean(acc)), float(np.mean(hit)), meter.epoch_equivalents(len(labels))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--views", default="raw,median")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_base = load_split(args.dataset, "train", args.cache)
    test = load_split(args.dataset, "test", args.cache)
    print("scenario,view,recall_at_1pct,recall_at_5pct,recall_mask,clean_mask_pct,judge_acc,judge_trigger_hits,"
          "epoch_equivalents,seconds", flush=True)
    for scenario in scenario_list(args.scenarios):
        train, mask = poison(train_base, scenario)
        trig = triggered_test(test, scenario)
        for view in args.views.split(","):
            t0 = time.monotonic()
            prep = median3 if view == "median" else (lambda a: a)
            p, acc, hit, cost = cross_fit(prep(train.images), train.labels, train.n_classes, prep(test.images),
                                          test.labels, prep(trig.images), scenario.target, args.epochs,
                                          args.folds, seed=0, threads=args.threads)
            r1, r5 = recall_at(-p, mask, (0.01, 0.05))
            removed = p < 0.005
            print(f"{scenario.name},{view},{100 * r1:.1f},{100 * r5:.1f},{100 * removed[mask].mean():.1f},"
                  f"{100 * removed[~mask].mean():.2f},{100 * acc:.2f},{100 * hit:.1f},{cost:.1f},"
                  f"{time.monotonic() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
