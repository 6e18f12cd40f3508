"""The grid flow on a real local Dask cluster: same table as a sequential run, survives a killed worker, reruns
from cache, and two grids at once share one MLflow store."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from incompat.data import write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE

SCENARIOS = ["paper:100:15", "paper:100:2", "paper:100:10"]
VOLATILE = {"wall_seconds"}


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_store):
    write_dataset(make_imageset(n_per_class=20, n_classes=10, size=32, prefix="train"), tmp_path / "train.parquet")
    write_dataset(make_imageset(n_per_class=2, n_classes=10, size=32, seed=1, prefix="test"),
                  tmp_path / "test.parquet")
    params = {"ingest": {"source": "train.parquet", "test_source": "test.parquet", "subset": None, "seed": 0},
              "poison": {"scenario": "paper:100:15"},
              "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64, "threads": 1},
              "defense": {"profile": "tiny"},
              "defense_profiles": {"tiny": {**TINY_PROFILE, "learner_train": {**TINY_PROFILE["learner_train"],
                                                                                "threads": 1}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def _table(path):
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(fh)]


def test_two_dask_workers_give_the_sequential_table_and_a_rerun_is_cached(project, mlflow_store):
    from flows.grid import run_grid
    from mlflow.tracking import MlflowClient

    sequential = run_grid(workers=1, scenarios=SCENARIOS, out="seq", retrain=True, threads_per_scenario=1)
    parallel = run_grid(workers=2, scenarios=SCENARIOS, out="par", retrain=True, threads_per_scenario=1,
                        memory_limit="2GiB")
    assert _table(sequential["csv"]) == _table(parallel["csv"])
    assert [row["scenario"] for row in _table(parallel["csv"])] == [
        "paper-s100-id15-3to7-pattern-0.1", "paper-s100-id02-3to5-ell-0.05", "paper-s100-id10-3to5-ell-0.1"]
    assert Path(parallel["markdown"]).read_text().count("\n") == 2 + len(SCENARIOS)
    client = MlflowClient(mlflow_store)
    children = client.search_runs([client.get_experiment_by_name("incompat").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parallel['mlflow_run_id']}'")
    assert len(children) == len(SCENARIOS)
    assert all("poison_removed" in c.data.metrics and "acc_after" in c.data.metrics for c in children)

    scores = sorted(Path("par").glob("scenarios/*/cluster/scores.parquet"))
    stamps = [p.stat().st_mtime_ns for p in scores]
    again = run_grid(workers=1, scenarios=SCENARIOS, out="par", retrain=True, threads_per_scenario=1)
    assert [p.stat().st_mtime_ns for p in scores] == stamps  # served from cache, nothing recomputed
    assert _table(again["csv"]) == _table(parallel["csv"])


def test_a_killed_worker_only_costs_its_scenario(project):
    from distributed import Client, LocalCluster

    from flows.grid import run_grid

    servers_before = {p.pid for p in psutil.process_iter(["cmdline"])
                      if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or [])}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_when_busy():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not killed:
                if any(Path("grid").glob("scenarios/*/poisoned/train.parquet")):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_when_busy)
        watcher.start()
        result = run_grid(dask_address=cluster.scheduler_address, scenarios=SCENARIOS, out="grid", retrain=False,
                          threads_per_scenario=1)
        watcher.join()
    assert killed, "no worker was killed: the grid finished before any scenario started?"
    rows = _table(result["csv"])
    assert len(rows) == len(SCENARIOS) and all(row["poison_total"] for row in rows)
    # the workers used this process's Prefect server: the killed one left no server of its own running
    orphans = [p.pid for p in psutil.process_iter(["cmdline"]) if p.pid not in servers_before
               and "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or [])
               and p.pid not in {c.pid for c in psutil.Process().children(recursive=True)}]
    assert not orphans, f"Prefect servers left running by the grid's workers: {orphans}"


def test_two_grids_at_once_share_one_mlflow_store(project, mlflow_store):
    cli = Path(sys.executable).with_name("incompat")
    procs = [subprocess.Popen([str(cli), "grid", "--scenario", scenario, "--out", f"g{i}", "--no-retrain",
                               "--quiet"], env={**os.environ, "PREFECT_HOME": str(project / f".prefect{i}")},
                              stderr=subprocess.PIPE, text=True)
             for i, scenario in enumerate(SCENARIOS[:2])]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("incompat").experiment_id])
    parents = [r for r in runs if r.data.tags.get("incompat.flow") == "grid"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    for parent in parents:
        assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 1
    for i in range(2):
        assert len(_table(project / f"g{i}" / "grid.csv")) == 1


def test_a_bad_scenario_fails_once_and_an_io_error_is_retried(project, monkeypatch):
    """run_scenario retries on I/O errors only: bad data is not retried, a briefly failing disk is."""
    from flows import grid as grid_flow
    from incompat import steps
    from incompat.data import DataError

    assert "prefect.server" not in Path(grid_flow.__file__).read_text()  # public Prefect API only
    monkeypatch.setattr(grid_flow.run_scenario, "retry_delay_seconds", 0)
    original, calls = steps.run_poison, []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(steps, "run_poison", counted)
    with pytest.raises(DataError, match="paper:100:99"):
        grid_flow.run_grid(workers=1, scenarios=["paper:100:99"], out="bad", retrain=False)
    assert calls == ["paper:100:99"]  # once: no retry

    def disk_hiccup(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError("disk briefly unavailable")
        return original(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(steps, "run_poison", disk_hiccup)
    result = grid_flow.run_grid(workers=1, scenarios=SCENARIOS[:1], out="ok", retrain=False)
    assert calls == SCENARIOS[:1] * 2 and len(result["rows"]) == 1
    # the flow run: named, with the table and the MLflow link as artifacts
    from tests.test_flows import _flow_run_and_artifacts

    run, artifacts = _flow_run_and_artifacts(result["prefect_flow_run_id"])
    assert run.name.startswith("grid 1 scenarios ")
    assert [row["scenario"] for row in json.loads(artifacts["grid-table"].data)] == [result["rows"][0]["scenario"]]
    assert f"/runs/{result['mlflow_run_id']}" in artifacts["grid-mlflow-run"].data
