"""Two `sanitize` runs at the same time, on different data, sharing one project (Prefect home and cache) and one
MLflow store: both finish, with correct and separate results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from incompat.data import read_dataset, write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE


def test_two_sanitize_runs_at_once_share_the_project_and_the_store(tmp_path, mlflow_store):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"defense": {"profile": "tiny"},
                                                          "defense_profiles": {"tiny": TINY_PROFILE}}))
    datasets = []
    for i in range(2):
        data = make_imageset(n_per_class=20 + 6 * i, n_classes=10, size=32, seed=10 + i, prefix=f"set{i}")
        write_dataset(data, tmp_path / f"set{i}.parquet")
        datasets.append(data)
    cli = Path(sys.executable).with_name("incompat")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(cli), "sanitize", f"set{i}.parquet", "--out", f"run{i}", "--json"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outputs]
    for i, (result, data) in enumerate(zip(results, datasets)):
        assert result["n_samples"] == len(data)
        clean = read_dataset(tmp_path / f"run{i}" / "clean.parquet", verify=True)
        assert set(clean.sample_ids) <= set(data.sample_ids)
        assert len(clean) + result["n_removed"] == len(data)
        record = json.loads((tmp_path / f"run{i}" / "lineage.json").read_text())
        assert record["mlflow_run_id"] == result["mlflow_run_id"]
        assert record["sources"][0]["path"].endswith(f"set{i}.parquet")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    runs = {r.info.run_id: r for r in client.search_runs(
        [client.get_experiment_by_name("incompat").experiment_id], "tags.`incompat.flow` = 'sanitize'")}
    assert set(runs) == {r["mlflow_run_id"] for r in results}
    for result in results:
        assert runs[result["mlflow_run_id"]].data.metrics["n_samples"] == result["n_samples"]
        assert runs[result["mlflow_run_id"]].info.status == "FINISHED"
