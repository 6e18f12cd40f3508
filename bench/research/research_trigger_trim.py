"""How the trigger stage's two tests see a poisoned class beside the clean ones (chose trigger_separation and
trigger_cluster on 2026-12-05).

Trains the stage's model once per scenario (the engine's recipe and seed: run_trigger_stage), keeps its
penultimate features in --cache, then scores offline: per class, SPECTRE (at each --trims) and its Otsu top group's
separation, and the silhouette of its two feature clusters, each relative to the median class. Prints the poisoned
class, the poisons its group and its smaller cluster hold, and the largest relative figures of the clean classes.

  .venv/bin/python bench/research/research_trigger_trim.py cifar10 paper:100:15,paper:100:18 --cache DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import load_split, scenario_list  # noqa: E402
from incompat.attacks import poison  # noqa: E402
from incompat.baselines import spectre  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.ispl import derive_seed  # noqa: E402
from incompat.training import ComputeMeter, TensorData, extract_features, fit  # noqa: E402
from incompat.trigger import class_clusters, top_group  # noqa: E402


def features_for(dataset, scenario, cfg, cache: Path):
    out = cache / f"{dataset}-{scenario.name}.npz"
    if out.exists():
        with np.load(out) as f:
            return f["features"], f["labels"], f["poison"]
    train, mask = poison(load_split(dataset, "train", ROOT / "bench" / "results" / "cache"), scenario)
    data = TensorData(train.images, train.labels, num_classes=train.n_classes)
    tcfg = dataclasses.replace(cfg.learner_train, epochs=cfg.trigger_epochs, flip=False, flip_pairs=(),
                               seed=derive_seed(cfg.seed, 5))
    model = fit(data, tcfg, meter=ComputeMeter(), progress=False)
    feats = extract_features(model, data)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, features=feats, labels=train.labels, poison=mask)
    return feats, train.labels, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--trims", default="0.3")
    args = ap.parse_args()
    cfg = load_params(ROOT / "params.yaml", profile="cpu_trigger").defense
    for scenario in scenario_list(args.scenarios):
        feats, labels, mask = features_for(args.dataset, scenario, cfg, args.cache)
        n_classes = int(labels.max()) + 1
        target = int(np.bincount(labels[mask]).argmax())
        minor, silhouette = class_clusters(feats, labels, n_classes, seed=derive_seed(cfg.seed, 5))
        sil = silhouette / np.nanmedian(silhouette)
        for trim in (float(t) for t in args.trims.split(",")):
            scores = spectre(feats, labels, n_classes, epsilon=trim / 1.5, rows_per_dim=20).scores
            found = {}
            for c in range(n_classes):
                rows = np.flatnonzero(labels == c)
                order = rows[np.argsort(-scores[rows], kind="stable")]
                split = top_group(np.log(np.maximum(scores[order], 1e-12)), cfg.trigger_max_share,
                                  cfg.trigger_min_size)
                if split:
                    found[c] = (split[1], int(mask[order[:split[0]]].sum()), split[0])
            median = np.median([v[0] for v in found.values()])
            clean_sep = max(v[0] for c, v in found.items() if c != target) / median
            clean_sil = np.nanmax(np.delete(sil, target))
            sep, held, size = found.get(target, (0.0, 0, 0))
            cluster = labels == target
            print(f"{scenario.name[:32]:32s} trim {trim:.2f} poisoned class {target}: separation {sep / median:.2f}x "
                  f"(group {size} holds {held}/{int(mask.sum())}), silhouette {sil[target]:.2f}x (minor cluster "
                  f"{int((minor & cluster).sum())} holds {int((minor & mask).sum())}) | clean classes at most "
                  f"{clean_sep:.2f}x and {clean_sil:.2f}x", flush=True)


if __name__ == "__main__":
    main()
