"""Research (issue 23): suspects from the features of a model trained on everything, then a judge trained on
everything but the suspects. Poisons whose trigger the full model learned cluster in its features; a judge that
never saw them predicts their source class, while a clean suspect keeps its label.

  .venv/bin/python bench/research/research_leave_out.py cifar10 paper:100:15 --epochs 12 --judge 6
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
from incompat.baselines import activation_clustering, spectral_signatures, spectre  # noqa: E402
from incompat.readers import subsample_stratified  # noqa: E402
from incompat.training import ComputeMeter, TensorData, TrainConfig, extract_features, fit, predict_logits  # noqa


def top_share(scores, labels, k, q):
    out = np.zeros(len(labels), bool)
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        out[rows[np.argsort(-scores[rows])[:int(np.ceil(q * len(rows)))]]] = True
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--subset", type=int)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--judge", type=int, default=6)
    ap.add_argument("--q", type=float, default=0.2)
    ap.add_argument("--score", default="spectral")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="/tmp/research/leave_out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full = load_split(args.dataset, "train", ROOT / "bench" / "results" / "cache")
    base = subsample_stratified(full, args.subset, seed=0) if args.subset else full
    for spec in args.scenarios.split("+"):
        for sc in ([load_scenario_yaml(spec)] if spec.endswith(".yaml") else scenario_list(spec)):
            t0 = time.monotonic()
            train, pm = poison(base, sc)
            n, k, y = len(train), train.n_classes, train.labels
            data = TensorData(train.images, y, num_classes=k)
            meter = ComputeMeter()
            model = fit(data, TrainConfig(epochs=args.epochs, lr=0.2), meter=meter, progress=False)
            p_all = torch.softmax(predict_logits(model, data, meter=meter), 1).numpy()
            feats = extract_features(model, data, meter=meter)
            scores = {"spectral": spectral_signatures(feats, y, k).scores, "spectre": spectre(feats, y, k).scores}
            ac = activation_clustering(feats, y, k)
            line = [f"{sc.name:34} poisons {pm.sum():4} p_all(poison) {np.median(p_all[pm, y[pm]]):.2f}",
                    f"ac {ac.remove_mask[pm].mean():.2f}@{ac.remove_mask[~pm].mean():.3f}"]
            for name, s in scores.items():
                for q in (0.05, 0.1, 0.2):
                    sus = top_share(s, y, k, q)
                    line.append(f"{name}{int(q * 100)} {sus[pm].mean():.2f}")
            print(" ".join(line), flush=True)
            sus = top_share(scores[args.score], y, k, args.q) | ac.remove_mask
            judge = fit(data, TrainConfig(epochs=args.judge, lr=0.2, seed=1), np.flatnonzero(~sus), meter=meter,
                        progress=False)
            idx = np.flatnonzero(sus)
            probs_j = torch.softmax(predict_logits(judge, data, meter=meter), 1).numpy()
            p = probs_j[idx, y[idx]]
            pj = np.ones(n)
            pj[idx] = p
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(args.save) / f"{args.dataset}-{sc.name}.npz", poison=pm, labels=y,
                                    p_all=p_all.astype(np.float16), probs_j=probs_j.astype(np.float16),
                                    suspects=sus, ac=ac.remove_mask, source=-1 if sc.source is None else sc.source,
                                    target=sc.target, **{f"score_{a}": b for a, b in scores.items()})
            parts = []
            for thr in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
                rem = pj < thr
                parts.append(f"<{thr}: {rem[pm].mean():.3f}@{rem[~pm].mean():.4f}")
            print(f"   suspects {sus.sum()} recall {sus[pm].mean():.3f}; judge removes (recall@clean) "
                  + " ".join(parts) + f"; ep-eq {meter.epoch_equivalents(n):.1f} {time.monotonic() - t0:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
