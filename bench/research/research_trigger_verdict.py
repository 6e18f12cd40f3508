"""Offline: the trigger stage's verdict threshold (trigger_threshold) on a benchmark's saved checkpoints.

Suspects never train a judge, so the threshold acts only on the final keep-mask: recomputed exactly from
`result.npz` (final judged p(label), the benchmark's keep, ground truth) and `trigger.npz` (the stage's scores and
clusters) of every scenario folder under ROOT/<dataset>-full/<scenario>/<profile>.

  .venv/bin/python bench/research/research_trigger_verdict.py CKPT/cifar10-full --profile cpu_trigger
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from incompat.config import load_params  # noqa: E402
from incompat.trigger import split_suspects  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("root", type=Path)
ap.add_argument("--profile", default="cpu_trigger")
ap.add_argument("--thresholds", default="0.5,0.9,0.95,1.0")
args = ap.parse_args()
cfg = load_params(ROOT / "params.yaml", profile=args.profile).defense
print("scenario,trigger_threshold,suspects,suspect_poisons,poison_total,recall_pct,clean_removed_pct")
for folder in sorted(p / args.profile for p in args.root.iterdir() if (p / args.profile / "trigger.npz").exists()):
    if not (folder / "result.npz").exists():
        continue
    r, z = np.load(folder / "result.npz"), np.load(folder / "trigger.npz")
    labels, poison, keep, judged = r["labels"], r["poison"], r["keep"], r["correct"]
    suspects, _ = split_suspects(z["scores"], labels, int(labels.max()) + 1, cfg.trigger_max_share,
                                 cfg.trigger_separation, cfg.trigger_min_size, z["minor"].astype(bool),
                                 z["silhouette"], cfg.trigger_cluster)
    # what the rest of the keep rule removed: the benchmark's mask without the suspects' verdict
    others = ~keep & ~(suspects & (judged < cfg.trigger_threshold))
    for th in (float(t) for t in args.thresholds.split(",")):
        removed = others | (suspects & (judged < th)) if th < 1 else others | suspects
        print(f"{folder.parent.name},{th},{suspects.sum()},{(suspects & poison).sum()},{poison.sum()},"
              f"{100 * removed[poison].mean():.1f},{100 * removed[~poison].mean():.2f}")
