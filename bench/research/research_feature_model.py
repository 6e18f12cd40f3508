"""Offline: the trigger stage's suspects drawn from another model's features, against the stage's own model.

For each scenario, the stage's suspects from its checkpoint (CKPT/<dataset>-full/<scenario>/<profile>/trigger.npz)
and the suspects that the same split (SPECTRE scores, ICA + 2-means clusters, split_suspects at the profile's
settings) draws from the features of
  --model undefended  the model bench_defense.py --checkpoints kept for the scenario (the final training's recipe);
  --model final       a fresh model of TrainConfig's own recipe (what `train` uses), trigger_epochs, no flips;
  --model learners    a fresh model of the stage's recipe (the learners', no flips), as a seed control.
A fresh model trains with --seed, on one thread.

  .venv/bin/python bench/research/research_feature_model.py gtsrb bench/scenarios/gtsrb-7to8-pixel-0.1.yaml CKPT
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_defense import load_split, scenario_list  # noqa: E402
from incompat.attacks import poison  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.ispl import draw_suspects  # noqa: E402
from incompat.steps import load_model  # noqa: E402
from incompat.training import TensorData, TrainConfig, extract_features, fit  # noqa: E402
from incompat.trigger import feature_tests  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("dataset")
ap.add_argument("scenarios", help="as bench_defense.py --scenarios")
ap.add_argument("ckpt", type=Path)
ap.add_argument("--profile", default="cpu_trigger")
ap.add_argument("--model", choices=["undefended", "final", "learners"], default="undefended")
ap.add_argument("--seed", type=int, default=12345)
args = ap.parse_args()
torch.set_num_threads(1)
cfg = load_params(ROOT / "params.yaml", profile=args.profile).defense
base = load_split(args.dataset, "train", ROOT / "bench" / "results" / "cache")


def draw(scores, minor, silhouette, labels, n_classes):
    return draw_suspects(scores, minor, silhouette, labels, n_classes, cfg)


print("scenario,model,suspects,poisons_among,poison_total,clean_suspects,groups")
for scenario in scenario_list(args.scenarios):
    train, poisoned = poison(base, scenario)
    labels, n_classes = train.labels, train.n_classes
    folder = args.ckpt / f"{args.dataset}-full" / scenario.name
    found = []
    if (folder / args.profile / "trigger.npz").exists():
        z = np.load(folder / args.profile / "trigger.npz")
        found.append(("stage", *draw(z["scores"], z["minor"].astype(bool), z["silhouette"], labels, n_classes)))
    data = TensorData(train.images, labels, num_classes=n_classes)
    if args.model == "undefended":
        model, _ = load_model(next(folder.glob("none-*.pt")))
        model = model.to(memory_format=torch.channels_last)
    else:
        recipe = TrainConfig() if args.model == "final" else cfg.learner_train
        model = fit(data, dataclasses.replace(recipe, epochs=cfg.trigger_epochs, flip=False, flip_pairs=(),
                                              seed=args.seed, threads=1), progress=False)
    # seed 0 for the clusters' ICA and silhouette sample (the figures in docs/results.md were drawn with it)
    tests = feature_tests(extract_features(model, data), labels, n_classes, cfg.trigger_max_share, seed=0)
    found.append((args.model, *draw(*tests, labels, n_classes)))
    for name, suspects, groups in found:
        marked = " ".join(f"{g['label']}:{g['size']}{g['found_by'][0]}" for g in groups)
        print(f"{scenario.name},{name},{suspects.sum()},{(suspects & poisoned).sum()},{poisoned.sum()},"
              f"{(suspects & ~poisoned).sum()},{marked}", flush=True)
