"""Offline: recall / clean removed of the cross-fitted keep rule at other thresholds, from a research checkpoint."""
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "research"))
from research_ispl import load  # noqa: E402
from incompat.ispl import DefenseConfig, cross_fit_keep, anomalous_cells  # noqa: E402

ck, dataset, subset, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
train, mask, sc = load(dataset, subset or None, spec)
state = torch.load(Path(ck) / "refinement.pt", weights_only=True)
probs = state["probs"].numpy()
y = train.labels
k = probs.shape[1]
n = len(y)
pl = probs[np.arange(n), y]
print("clean p(label) quantiles", np.quantile(pl[~mask], [.02, .05, .1, .2]).round(4),
      "poison", np.quantile(pl[mask], [.5, .8, .9, .95, .99]).round(4))
for thr in (0.002, 0.005, 0.01, 0.02, 0.05):
    for ratio in (0, 3):
        cfg = DefenseConfig(refinement_threshold=thr, anomaly_ratio=ratio, anomaly_z=5, anomaly_threshold=0.5)
        keep = cross_fit_keep(probs, y, k, cfg)
        cells = np.argwhere(anomalous_cells(probs, y, k, 0.5, 3, 5)) if ratio else []
        print(f"thr {thr} ratio {ratio}: recall {100 * (~keep)[mask].mean():.1f} clean {100 * (~keep)[~mask].mean():.2f}%"
              f" cells {[tuple(c) for c in cells]}")
