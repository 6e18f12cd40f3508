"""Offline study: do the training losses of the trigger stage's model (every sample, the learners' recipe without
flips) single out the poisons of a learned trigger? Records each sample's loss every epoch, in the batch that
trains on it (free: no extra pass), and prints the recall at 1/5% of the clean images of some scores of that curve,
over all samples and within the target class. Poisons of a learned trigger start as mislabelled images of the
source class and are fitted together once the trigger is learned; a hard clean image is fitted alone, by
memorising it.

  .venv/bin/python bench/research/research_loss_dynamics.py cifar10 paper:100:10 --epochs 12 --save CKPT
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import incompat.training as training  # noqa: E402
from bench_defense import load_split, scenario_list  # noqa: E402
from ranking import recall_at  # noqa: E402
from incompat.attacks import poison  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.training import TensorData, extract_features, fit  # noqa: E402


class _Recorder:
    """Stands in for torch.nn.functional inside incompat.training: keeps each batch's per-sample losses."""

    def __init__(self):
        self.losses = []
        self.predicted = []

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, *args, **kwargs):
        out = F.cross_entropy(*args, **kwargs)
        self.losses.append(out.detach().float().cpu())
        self.predicted.append(args[0].detach().argmax(1).cpu())
        return out


def loss_curves(images, labels, n_classes, cfg, epochs):
    data = TensorData(images, labels, num_classes=n_classes)
    recorder, seen = _Recorder(), []
    original = data.augmented_batch

    def batch(idx, generator, **kwargs):
        seen.append(idx.clone().cpu())
        return original(idx, generator, **kwargs)

    data.augmented_batch = batch
    training.F = recorder
    try:
        model = fit(data, dataclasses.replace(cfg, epochs=epochs, flip=False, flip_pairs=()), progress=False)
    finally:
        training.F = F
    curves = np.full((epochs, len(labels)), np.nan, dtype=np.float32)
    predicted = np.full((epochs, len(labels)), -1, dtype=np.int16)
    steps = len(seen) // epochs
    for s, (idx, loss, pred) in enumerate(zip(seen, recorder.losses, recorder.predicted)):
        curves[s // steps, idx.numpy()] = loss.numpy()
        predicted[s // steps, idx.numpy()] = pred.numpy()
    return curves, predicted, extract_features(model, data).astype(np.float16)


def scores(curves: np.ndarray) -> dict[str, np.ndarray]:
    c = np.where(np.isnan(curves), np.nanmean(curves, axis=1, keepdims=True), curves)
    epochs = len(c)
    learned_at = np.argmax(np.concatenate([c < 0.5, np.ones((1, c.shape[1]), bool)]), axis=0).astype(float)
    drops = c[:-1] - c[1:]
    out = {"mean_loss": c.mean(0), "early_loss": c[: epochs // 3].mean(0), "late_loss": c[-epochs // 3:].mean(0),
           "learned_at": learned_at, "largest_drop": drops.max(0)}
    # high loss early and fitted late: the difference between the thirds
    out["early_minus_late"] = out["early_loss"] - out["late_loss"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--save", type=Path, default=None, help="keep each scenario's curves here (npz)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache")
    args = ap.parse_args()
    cfg = load_params(ROOT / "params.yaml").defense.learner_train
    base = load_split(args.dataset, "train", args.cache)
    print("scenario,score,sign,recall_at_1pct,recall_at_5pct,target_recall_at_5pct,seconds", flush=True)
    for scenario in scenario_list(args.scenarios):
        train, mask = poison(base, scenario)
        t0 = time.monotonic()
        out = args.save / f"{scenario.name}.npz" if args.save else None
        if out is not None and out.exists():
            curves = np.load(out)["curves"]
        else:
            curves, predicted, features = loss_curves(train.images, train.labels, train.n_classes, cfg, args.epochs)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                np.savez(out, curves=curves, predicted=predicted, features=features, poison=mask,
                         labels=train.labels)
        seconds = time.monotonic() - t0
        in_target = train.labels == scenario.target
        for name, value in scores(curves).items():
            for sign in (1, -1):
                r1, r5 = recall_at(sign * value, mask, (0.01, 0.05))
                (t5,) = recall_at(sign * value[in_target], mask[in_target], (0.05,))
                print(f"{scenario.name},{name},{sign},{100 * r1:.1f},{100 * r5:.1f},{100 * t5:.1f},{seconds:.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
