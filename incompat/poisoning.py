"""The poison step's files: a poisoned training set, its ground truth, the triggered test set, the scenario."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from incompat.attacks import parse_scenario_spec, poison, resolve, triggered_test
from incompat.data import read_dataset, write_dataset
from incompat.files import atomic_output, write_text_atomic


def write_poisoned(dataset_path: str | os.PathLike, spec: str, out_dir: str | os.PathLike,
                   test_path: str | os.PathLike | None = None) -> dict:
    """Everything is computed (and every error raised) before the first file is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scenario = parse_scenario_spec(spec)
    train = read_dataset(dataset_path)
    poisoned, poison_mask = poison(train, scenario)
    test_triggered = triggered_test(read_dataset(test_path), scenario) if test_path else None
    resolved = resolve(scenario, train)
    resolved["resolved"]["spec"] = spec
    resolved["resolved"]["source_dataset"] = {"path": str(dataset_path), "digest": train.dataset_digest()}
    out_dir = Path(out_dir)
    files = [out_dir / "train.parquet", out_dir / "truth.parquet", out_dir / "scenario.yaml"]
    write_dataset(poisoned, files[0], metadata={"scenario": scenario.name})
    truth = pa.table({"sample_id": pa.array(poisoned.sample_ids.astype(str).tolist()),
                      "is_poison": pa.array(poison_mask)})
    with atomic_output(files[1]) as tmp:
        pq.write_table(truth, tmp)
    if test_triggered is not None:
        files.append(out_dir / "test_triggered.parquet")
        write_dataset(test_triggered, files[-1], metadata={"scenario": scenario.name, "target": scenario.target})
    write_text_atomic(files[2], yaml.safe_dump(resolved, sort_keys=False))
    return {"scenario": scenario.name, "n_samples": len(poisoned), "n_poison": int(np.sum(poison_mask)),
            "target": scenario.target, "source": scenario.source, "files": [str(f) for f in files]}
