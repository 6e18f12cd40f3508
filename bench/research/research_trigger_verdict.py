"""Offline: the trigger stage's verdict threshold (trigger_threshold) on a benchmark's saved checkpoints.

Suspects never train a judge, so the threshold acts only on the final keep-mask: recomputed exactly from
`result.npz` (final judged p(label), the benchmark's keep, ground truth) and `trigger.npz` (the stage's scores and
clusters) of every scenario folder under ROOT/<dataset>-full/<scenario>/<profile>.

  .venv/bin/python bench/research/research_trigger_verdict.py CKPT/cifar10-full --profile cpu_trigger

The row `none` has no verdict: the suspects are still kept out of the judges' training, then judged as every
other sample (the keep rule recomputed from the judges' p(label) of every class in `refinement.pt`). --groups
prints, per marked group instead, its poisons and the median of its judged p(label): whether a verdict on the
whole group (its median below a bar) could tell a trigger from a clean group the judges reject.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from incompat.config import load_params  # noqa: E402
from incompat.ispl import cross_fit_keep, draw_suspects  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("root", type=Path)
ap.add_argument("--profile", default="cpu_trigger")
ap.add_argument("--thresholds", default="0.5,0.9,0.95,1.0")
ap.add_argument("--groups", action="store_true", help="one line per marked group instead of per threshold")
args = ap.parse_args()
cfg = load_params(ROOT / "params.yaml", profile=args.profile).defense
print("scenario,label,found_by,size,poisons,median_judged_p_label" if args.groups else
      "scenario,trigger_threshold,suspects,suspect_poisons,poison_total,recall_pct,clean_removed_pct")
for folder in sorted(p / args.profile for p in args.root.iterdir() if (p / args.profile / "trigger.npz").exists()):
    if not (folder / "result.npz").exists():
        continue
    r, z = np.load(folder / "result.npz"), np.load(folder / "trigger.npz")
    labels, poison, keep, judged = r["labels"], r["poison"], r["keep"], r["correct"]
    n_classes, scores, minor = int(labels.max()) + 1, z["scores"], z["minor"].astype(bool)  # an npz reads per access
    suspects, groups = draw_suspects(scores, minor, z["silhouette"], labels, n_classes, cfg)
    if args.groups:
        for g in groups:
            rows = np.flatnonzero(labels == g["label"])
            if g["found_by"] == "scores":  # split_suspects' top group: the class's `size` highest scores
                rows = rows[np.argsort(-scores[rows], kind="stable")][:g["size"]]
            else:
                rows = rows[minor[rows]]
            print(f"{folder.parent.name},{g['label']},{g['found_by']},{len(rows)},{poison[rows].sum()},"
                  f"{np.median(judged[rows]):.3f}")
        continue
    # what the rest of the keep rule removed: the benchmark's mask without the suspects' verdict
    others = ~keep & ~(suspects & (judged < cfg.trigger_threshold))
    for th in (float(t) for t in args.thresholds.split(",")):
        removed = others | (suspects & (judged < th)) if th < 1 else others | suspects
        print(f"{folder.parent.name},{th},{suspects.sum()},{(suspects & poison).sum()},{poison.sum()},"
              f"{100 * removed[poison].mean():.1f},{100 * removed[~poison].mean():.2f}")
    if (folder / "refinement.pt").exists():
        probs = torch.load(folder / "refinement.pt", weights_only=True)["probs"].numpy()
        removed = ~cross_fit_keep(probs, labels, n_classes, cfg)
        print(f"{folder.parent.name},none,{suspects.sum()},{(suspects & poison).sum()},{poison.sum()},"
              f"{100 * removed[poison].mean():.1f},{100 * removed[~poison].mean():.2f}")
