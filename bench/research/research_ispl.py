"""Research harness for the cpu profile: run ISPL weak learners once (checkpointed), then score variants of the
vote offline against the ground truth. Prints diagnostics; never part of the tests.

  OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/research/research_ispl.py --subset 10000 --scenario paper:100:2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from incompat.attacks import parse_scenario_spec, poison  # noqa: E402
from incompat.config import load_params, parse_overrides  # noqa: E402
from incompat.data import read_dataset  # noqa: E402
from incompat.ispl import run_defense  # noqa: E402
from incompat.readers import subsample_stratified  # noqa: E402
from bench.bench_defense import GTSRB_SCENARIOS  # noqa: E402


def load(dataset, subset, spec):
    full = read_dataset(ROOT / "bench" / "results" / "cache" / f"{dataset}-train.parquet")
    base = subsample_stratified(full, subset, seed=0) if subset else full
    if spec.startswith("gtsrb"):
        scenario = GTSRB_SCENARIOS[int(spec.split(":")[1])]
    else:
        scenario = parse_scenario_spec(spec)
    train, mask = poison(base, scenario)
    return train, mask, scenario


def rates(removed, mask):
    return 100 * removed[mask].mean(), 100 * removed[~mask].mean(), int(removed[mask].sum()), int(removed[~mask].sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--scenario", default="paper:100:2")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tag", default="")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    overrides.setdefault("learner_train", {})["threads"] = args.threads
    params = load_params(args.params, profile=args.profile, defense_overrides=overrides)
    cfg = params.defense
    train, mask, scenario = load(args.dataset, args.subset or None, args.scenario)
    key = hashlib.sha1(json.dumps([args.dataset, args.subset, args.scenario, cfg.to_dict()], sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
    ckdir = ROOT / "bench" / "results" / "research" / key
    t0 = time.monotonic()
    def observe(kind, info):
        if kind in ("vote", "refinement"):
            kept = np.zeros(len(mask), bool)
            kept[info["kept_indices"]] = True
            print(f"  {kind} {info.get('round', '')}: removed poison {(~kept)[mask].sum()}/{mask.sum()} "
                  f"clean {100 * (~kept)[~mask].mean():.1f}% t={time.monotonic() - t0:.0f}s", flush=True)
    print(f"## start {args.tag} {args.scenario} subset={args.subset} {json.dumps(overrides)}", flush=True)
    res = run_defense(train.images, train.labels, train.n_classes, cfg, checkpoint_dir=ckdir, observe=observe)
    secs = time.monotonic() - t0
    labels = train.labels
    n = len(labels)
    removed = ~res.keep_mask
    r, c, rp, rc = rates(removed, mask)
    print(f"## {args.tag} {scenario.name} n={n} poisons={mask.sum()} {json.dumps(overrides)}")
    print(f"FINAL recall {r:.1f}% ({rp}) clean-removed {c:.1f}% ({rc}) secs {secs:.0f} "
          f"ep-eq {res.meter.epoch_equivalents(n):.2f} ckpt {key}")
    src, tgt = scenario.source, scenario.target
    for rec in res.learners:
        core = rec.core_set
        out = ~core
        acc_out = (rec.predictions[out] == labels[out]).mean() if out.any() else float("nan")
        acc_in = (rec.predictions[core] == labels[core]).mean()
        pp = rec.predictions[mask]
        print(f"learner b{rec.bag}-{rec.index}: core {core.sum()} poisons-in-core {(core & mask).sum()} "
              f"acc-in {acc_in:.3f} acc-out {acc_out:.3f} poison->src {(pp == src).mean():.2f} "
              f"->tgt {(pp == tgt).mean():.2f}")
    print("vote agreement: poison mean %.3f clean mean %.3f" % (res.vote_agreement[mask].mean(),
                                                                 res.vote_agreement[~mask].mean()))
    k = train.n_classes
    p_ho = held_out_probs(res.learners, k)
    cell_report(p_ho, labels, mask, src, tgt, k, "held-out soft")
    p_all = np.stack([r.probabilities.astype(np.float32) for r in res.learners]).mean(0)
    cell_report(p_all, labels, mask, src, tgt, k, "all soft")
    np.save(ckdir / "p_ho.npy", p_ho)
    for h in res.refinement_rounds:
        print("refinement", h)
    np.savez(ckdir / "analysis.npz", mask=mask, labels=labels, keep=res.keep_mask,
             suspicion=res.suspicion)




def held_out_probs(learners, n_classes):
    """Mean softmax over the learners whose core set does not hold the sample (all learners where none)."""
    probs = np.stack([rec.probabilities.astype(np.float32) for rec in learners])  # (L, N, C)
    out = np.stack([~rec.core_set for rec in learners]).astype(np.float32)  # (L, N)
    none_out = out.sum(0) == 0
    out[:, none_out] = 1.0
    return (probs * out[:, :, None]).sum(0) / out.sum(0)[:, None]


def cell_report(p, labels, mask, src, tgt, n_classes, tag):
    win = p.argmax(1)
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (labels, win), 1)
    nc = np.bincount(labels, minlength=n_classes)
    acc_clean = (win[~mask] == labels[~mask]).mean()
    exp = conf.T * (nc[:, None] / np.maximum(nc[None, :], 1))
    z = (conf - exp) / np.sqrt(exp + 1)
    np.fill_diagonal(z, -np.inf)
    top = np.dstack(np.unravel_index(np.argsort(-z.ravel())[:4], z.shape))[0]
    print(f"[{tag}] held-out acc clean {acc_clean:.3f}; poison win: src {(win[mask] == src).mean():.2f} "
          f"tgt {(win[mask] == tgt).mean():.2f}; cell(t,s)={conf[tgt, src]} cell(s,t)={conf[src, tgt]} "
          f"top z cells: " + ", ".join(f"({a},{b}) z={z[a, b]:.1f} n={conf[a, b]}" for a, b in top))
    return conf, z


if __name__ == "__main__":
    main()
