"""The compatibility test on the trigger stage's groups, in the direction the stage's verdict does not look: does
training on a class's group teach the rest of its class?

The verdict asks whether the rest of the class teaches a suspect (judged p(label)); a clean subgroup of a class
(one kind of automobile) is also poorly taught by the rest, so it fails that test like a poison group does
(paper:100:6). The other direction separates them in principle: a model that saw the class only through a poison
group (source-class images with a trigger) has learned the trigger or the source class, not the labelled class,
and calls the rest of the class something else; a clean subgroup still shows the class.

Per scenario: the stage's scores, clusters and marked groups (the engine's run_trigger_stage and split_suspects,
cached in --cache, or a benchmark's trigger.npz via --trigger). For every class's top score group, and every
marked cluster group: model A trains on the group plus --others samples of each other class; model B on a random
group of the same class and size plus the same others; both judge the rest of the class (outside both groups).
Prints mean p(class) on that rest under A and B and their ratio, with the poisons each group holds.

  .venv/bin/python bench/research/research_group_compat.py cifar10 paper:100:6 --cache DIR \
      [--trigger paper-s100-id06-9to2-pixel-0.05=CKPT/.../trigger.npz]
"""
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import load_split, scenario_list  # noqa: E402
from incompat.attacks import poison  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.ispl import derive_seed, draw_suspects  # noqa: E402
from incompat.training import ComputeMeter, TensorData, fit, predict_logits  # noqa: E402
from incompat.trigger import run_trigger_stage, top_group  # noqa: E402


def stage_for(scenario, data, images, labels, n_classes, cfg, cache: Path, given: dict[str, Path]):
    out = given.get(scenario.name, cache / f"{scenario.name}-trigger.npz")
    if not out.exists():
        stage = run_trigger_stage(data, images, labels, n_classes, cfg.learner_train, cfg.trigger_epochs,
                                  cfg.trigger_max_share, False, cfg.mirror_share, ComputeMeter(),
                                  derive_seed(cfg.seed, 5))
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(out, scores=stage.scores, minor=stage.minor, silhouette=stage.silhouette)
    with np.load(out) as f:
        return f["scores"], f["minor"], f["silhouette"]


def candidate_groups(scores, minor, silhouette, labels, n_classes, cfg):
    marked, groups = draw_suspects(scores, minor, silhouette, labels, n_classes, cfg)
    candidates = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        order = rows[np.argsort(-scores[rows], kind="stable")]
        split = top_group(np.log(np.maximum(scores[order], 1e-12)), cfg.trigger_max_share, cfg.trigger_min_size)
        if split is not None:
            hit = [g for g in groups if g["label"] == c and g["found_by"] == "scores"]
            candidates.append((c, "scores", order[:split[0]], hit[0]["relative"] if hit else None))
    for g in groups:
        if g["found_by"] == "clusters":
            candidates.append((g["label"], "clusters", np.flatnonzero((labels == g["label"]) & minor),
                               g["relative"]))
    return candidates, marked


def taught(data, labels, group, others, rest, c, cfg, seed):
    tcfg = dataclasses.replace(cfg, seed=seed)
    model = fit(data, tcfg, indices=np.concatenate([group, others]), progress=False)
    p = torch.softmax(predict_logits(model, data, rest), 1)[:, c].numpy()
    return float(p.mean()), float((p >= 0.5).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("scenarios")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--trigger", action="append", default=[], help="SCENARIO_NAME=path/to/trigger.npz")
    ap.add_argument("--others", type=int, default=500, help="samples of each other class in both trainings")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--classes", default="", help="only these classes' groups (comma list; default all)")
    ap.add_argument("--marked-only", action="store_true", help="only the groups the stage marks")
    args = ap.parse_args()
    cfg = load_params(ROOT / "params.yaml", profile="cpu_trigger").defense
    given = {k: Path(v) for k, v in (t.split("=", 1) for t in args.trigger)}
    tcfg = dataclasses.replace(cfg.learner_train, epochs=args.epochs, flip=False, flip_pairs=())
    only = {int(c) for c in args.classes.split(",") if c}
    for scenario in scenario_list(args.scenarios):
        train, mask = poison(load_split(args.dataset, "train", ROOT / "bench" / "results" / "cache"), scenario)
        labels, n_classes = train.labels, train.n_classes
        data = TensorData(train.images, labels, num_classes=n_classes)
        scores, minor, silhouette = stage_for(scenario, data, train.images, labels, n_classes, cfg, args.cache,
                                              given)
        candidates, marked = candidate_groups(scores, minor, silhouette, labels, n_classes, cfg)
        print(f"# {scenario.name}: marked {int(marked.sum())} ({int((marked & mask).sum())} of "
              f"{int(mask.sum())} poisons)", flush=True)
        rng = np.random.default_rng(derive_seed(cfg.seed, 71))
        for k, (c, how, group, relative) in enumerate(candidates):
            if (only and c not in only) or (args.marked_only and relative is None):
                continue
            t0 = time.monotonic()
            rows = np.flatnonzero(labels == c)
            outside = np.setdiff1d(rows, group)
            random_group = rng.choice(outside, size=min(len(group), len(outside) // 2), replace=False)
            rest = np.setdiff1d(outside, random_group)
            others = np.concatenate([rng.permutation(np.flatnonzero(labels == o))[:args.others]
                                     for o in range(n_classes) if o != c])
            seed = derive_seed(cfg.seed, 72, k)
            pa, sa = taught(data, labels, group, others, rest, c, tcfg, seed)
            pb, sb = taught(data, labels, random_group, others, rest, c, tcfg, seed)
            print(f"{scenario.name[:34]:34s} class {c:2d} {how:8s} marked {str(relative):5s} size {len(group):5d} "
                  f"poisons {int(mask[group].sum()):4d} rest {len(rest):5d} (poisons {int(mask[rest].sum()):4d}) | "
                  f"p(class) group {pa:.3f} random {pb:.3f} ratio {pa / max(pb, 1e-9):.2f} | "
                  f"share>=0.5 {sa:.3f} / {sb:.3f} | {time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
