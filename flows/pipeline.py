"""The default pipeline, step by step, driven by params.yaml: ingest -> poison -> sanitize -> retrain -> evaluate.

Each step reads the previous step's files and writes its own under data/ (atomically), so a step can be rerun
alone. This module orchestrates only: the arithmetic lives in the engine (incompat/).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from incompat.config import Params
from incompat.data import read_dataset
from incompat.files import write_text_atomic

DATA = Path("data")


def step_ingest(params: Params, data_dir: Path = DATA) -> dict:
    from incompat.readers import ingest

    p = params.ingest
    size = tuple(p.image_size) if p.image_size else None
    train = ingest(p.source, data_dir / "raw" / "train.parquet", subset=p.subset, seed=p.seed, image_size=size,
                   on_bad_sample=p.on_bad_sample)
    test = ingest(p.test_source, data_dir / "raw" / "test.parquet", image_size=size,
                  on_bad_sample=p.on_bad_sample) if p.test_source else None
    return {"train": train, "test": test}


def step_poison(params: Params, data_dir: Path = DATA) -> dict:
    from incompat.poisoning import write_poisoned

    test = data_dir / "raw" / "test.parquet"
    return write_poisoned(data_dir / "raw" / "train.parquet", params.poison.scenario, data_dir / "poisoned",
                          test_path=test if test.exists() else None)


def step_sanitize(params: Params, data_dir: Path = DATA, progress: bool = False) -> dict:
    from incompat.sanitize import read_truth, sanitize

    dataset = read_dataset(data_dir / "poisoned" / "train.parquet")
    truth_path = data_dir / "poisoned" / "truth.parquet"
    truth = read_truth(truth_path, dataset) if truth_path.exists() else None
    _, outputs = sanitize(dataset, params.defense, data_dir / "clean", truth_mask=truth, progress=progress,
                          checkpoint_dir=data_dir / "checkpoints", extra_metrics={"profile": params.profile})
    return outputs.metrics_values


def step_retrain_and_evaluate(params: Params, data_dir: Path = DATA, progress: bool = False) -> dict:
    """Train on the poisoned set (before) and on the kept set (after); evaluate both on clean + triggered test."""
    import torch
    import yaml

    from incompat.evaluation import train_and_evaluate

    poisoned = read_dataset(data_dir / "poisoned" / "train.parquet")
    clean = read_dataset(data_dir / "clean" / "clean.parquet")
    test = read_dataset(data_dir / "raw" / "test.parquet")
    trig_path = data_dir / "poisoned" / "test_triggered.parquet"
    triggered = read_dataset(trig_path) if trig_path.exists() else None
    scenario = yaml.safe_load((data_dir / "poisoned" / "scenario.yaml").read_text())
    target = scenario["attack"]["target"]
    results = {}
    for name, train in (("before", poisoned), ("after", clean)):
        t0 = time.monotonic()
        ev = train_and_evaluate(train, test, params.train, test_triggered=triggered, target=target,
                                progress=progress)
        results[name] = {**ev.as_dict(), "seconds": time.monotonic() - t0}
        if name == "after":
            (data_dir / "models").mkdir(parents=True, exist_ok=True)
            torch.save(ev.model.state_dict(), data_dir / "models" / "model.pt")
    report = {"scenario": scenario["name"], **{f"{k}_{name}": v for name, r in results.items()
                                                for k, v in r.items()}}
    (data_dir / "reports").mkdir(parents=True, exist_ok=True)
    write_text_atomic(data_dir / "reports" / "evaluation.json", json.dumps(report, indent=2))
    return report


def run_all(params: Params, data_dir: Path = DATA, progress: bool = False, echo=print) -> dict:
    t0 = time.monotonic()
    echo(f"[1/4] ingest {params.ingest.source} (subset {params.ingest.subset})")
    step_ingest(params, data_dir)
    echo(f"[2/4] poison with {params.poison.scenario}")
    step_poison(params, data_dir)
    echo(f"[3/4] sanitize (ISPL+B, profile {params.profile})")
    sanitized = step_sanitize(params, data_dir, progress)
    echo(f"      removed {sanitized['n_removed']} of {sanitized['n_samples']}"
         + (f"; poison removed {sanitized['poison_removed']}/{sanitized['poison_total']}"
            if "poison_total" in sanitized else ""))
    echo("[4/4] retrain before/after and evaluate")
    report = step_retrain_and_evaluate(params, data_dir, progress)
    echo(f"      clean accuracy {report['clean_accuracy_before']:.4f} -> {report['clean_accuracy_after']:.4f}; "
         f"attack success {report['attack_success_rate_before']:.4f} -> {report['attack_success_rate_after']:.4f}")
    echo(f"done in {time.monotonic() - t0:.0f} s")
    echo(f"cleaned dataset: {data_dir / 'clean' / 'clean.parquet'}")
    echo(f"removed samples: {data_dir / 'clean' / 'removed.parquet'}")
    echo(f"report:          {data_dir / 'reports' / 'evaluation.json'}")
    return {"sanitize": sanitized, "evaluation": report}
