"""The Prefect flows with real components: Prefect's local engine, a real MLflow store, lineage on disk."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from incompat import steps as engine_steps
from incompat.data import DataError, read_dataset, write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_store):
    write_dataset(make_imageset(n_per_class=30, n_classes=10, size=32, prefix="train"), tmp_path / "train.parquet")
    write_dataset(make_imageset(n_per_class=5, n_classes=10, size=32, seed=1, prefix="test"),
                  tmp_path / "test.parquet")
    params = {
        "ingest": {"source": "train.parquet", "test_source": "test.parquet", "subset": 200, "seed": 0},
        "poison": {"scenario": "paper:100:15"},
        "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64, "lr": 0.05},
        "defense": {"profile": "tiny"},
        "defense_profiles": {"tiny": TINY_PROFILE},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def step_calls(monkeypatch):
    """Counts the engine step calls, to tell a step that ran from one served from Prefect's cache."""
    calls = []
    for name in ("run_ingest", "run_poison", "run_cluster", "run_filter", "run_retrain", "run_evaluate",
                 "run_report"):
        original = getattr(engine_steps, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name[4:])
            return _original(*args, **kwargs)

        monkeypatch.setattr(engine_steps, name, wrapper)
    return calls


def _runs(uri, **filters):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("incompat")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def test_evaluate_flow_logs_everything_and_an_unchanged_rerun_is_cached(project, mlflow_store, step_calls):
    from flows.evaluate import evaluate

    result = evaluate(params_path="params.yaml", data_dir="data")
    assert step_calls == ["ingest", "poison", "cluster", "filter", "retrain", "evaluate", "report"]
    run_id = result["mlflow_run_id"]
    client, runs = _runs(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == result["prefect_flow_run_id"]
    assert "incompat.engine_sha256" in run.data.tags and "mlflow.source.git.commit" in run.data.tags
    assert run.data.params["defense.boost"] == "2" and run.data.params["profile"] == "tiny"
    assert not [k for k in run.data.params if k.startswith("defense_profiles")]  # only the profile in use
    # final metrics = metrics.json + evaluation.json
    metrics = json.loads((project / "data" / "clean" / "metrics.json").read_text())
    assert run.data.metrics["n_removed"] == metrics["n_removed"]
    assert run.data.metrics["poison_total"] == 2
    assert "attack_success_rate_after" in run.data.metrics
    # per-round curve: one step per ISPL round, vote and refinement round
    events = json.loads((project / "data" / "cluster" / "rounds.json").read_text())
    history = client.get_metric_history(run_id, "ispl.kept_fraction")
    assert len({m.step for m in history}) == sum(e["kind"] == "round" for e in events) >= 2
    refinement = client.get_metric_history(run_id, "refinement.kept_fraction")
    assert min(m.step for m in refinement) > max(m.step for m in history)
    assert client.get_metric_history(run_id, "ispl.poison_kept")
    # weak learners are nested runs
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
    assert len(children) == metrics["n_learners"] == 2
    assert all("core.core_size" in c.data.metrics for c in children)
    # dataset inputs with their digests
    inputs = {tag.value: d for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}
    assert {"ingested", "poisoned", "cleaned", "removed"} <= set(inputs)
    cleaned_digest = next(t.value for t in inputs["cleaned"].tags if t.key == "incompat.dataset_digest")
    assert cleaned_digest == result["filter"]["clean_digest"]
    # artifacts: removed-sample manifest, lineage, report, model
    artifacts = {a.path for a in client.list_artifacts(run_id, "sanitization")}
    assert {"sanitization/removed_samples.csv", "sanitization/lineage.json"} <= artifacts
    assert "report/report.html" in {a.path for a in client.list_artifacts(run_id, "report")}
    assert "model_weights/after.pt" in {a.path for a in client.list_artifacts(run_id, "model_weights")}
    local = client.download_artifacts(run_id, "sanitization/removed_samples.csv", str(project))
    assert sum(1 for _ in open(local)) == metrics["n_removed"] + 1
    # the lineage names this run
    record = json.loads((project / "data" / "clean" / "lineage.json").read_text())
    assert record["mlflow_run_id"] == run_id and record["prefect_flow_run_id"] == result["prefect_flow_run_id"]

    step_calls.clear()
    again = evaluate(params_path="params.yaml", data_dir="data")
    assert step_calls == []  # every step served from Prefect's cache
    assert again["filter"]["clean_digest"] == result["filter"]["clean_digest"]
    assert again["mlflow_run_id"] != run_id  # ... and still a run of its own in MLflow


def test_a_changed_parameter_reruns_only_what_depends_on_it(project, step_calls):
    from flows.evaluate import evaluate

    evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    step_calls.clear()
    evaluate(params_path="params.yaml", data_dir="data", retrain=False, overrides={"seed": 1})
    assert step_calls == ["cluster", "filter", "report"]


def test_a_cached_step_whose_files_changed_runs_again(project, step_calls):
    from flows.evaluate import evaluate

    evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    (project / "data" / "clean" / "clean.parquet").unlink()
    step_calls.clear()
    evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    # the filter step runs again; only the report, which shows the (re-timestamped) lineage, follows it
    assert step_calls == ["filter", "report"]
    assert read_dataset(project / "data" / "clean" / "clean.parquet", verify=True)


def _tamper_pixel(path):
    """Change one image byte in place, leaving the stored digests alone (an edit after the fact)."""
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    first = bytearray(images[0])
    first[0] ^= 0xFF
    images[0] = bytes(first)
    column = table.column_names.index("image")
    table = table.set_column(column, "image", pa.array(images, type=pa.large_binary()))
    pq.write_table(table, path)


def test_lineage_verifies_the_chain_and_catches_a_changed_file(project, capsys):
    from flows.evaluate import evaluate

    evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    capsys.readouterr()
    assert main(["lineage", "data/clean/clean.parquet"]) == 0
    out = capsys.readouterr().out
    for step in ("ingest", "poison", "cluster", "filter"):
        assert f"{step}:" in out
    assert "changed" not in out and "[     ok] base" not in out  # source lines carry their step
    assert "ingest: base" in out and "paper-s100-id15" in out

    # a copied run folder still verifies (paths are relative to the record first)
    shutil.copytree(project / "data", project / "copy" / "data")
    assert main(["lineage", "copy/data/clean/lineage.json", "--quiet"]) == 0

    _tamper_pixel(project / "data" / "poisoned" / "train.parquet")
    assert main(["lineage", "data/clean"]) == 1
    err = capsys.readouterr().err
    assert "poisoned/train.parquet" in err and "changed after the fact" in err and "Traceback" not in err

    _tamper_pixel(project / "train.parquet")  # the raw source itself
    assert main(["lineage", "copy/data/clean", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = [c for c in report["checks"] if c["status"] != "ok"]
    assert any(c["path"].endswith("/train.parquet") and "ingest" in c["role"] for c in bad)


def test_lineage_of_a_path_without_a_record_is_a_clear_error(tmp_path, capsys):
    assert main(["lineage", str(tmp_path / "nothing.parquet")]) == 1
    assert "no lineage record" in capsys.readouterr().err


def _incoming(project):
    base = read_dataset(project / "train.parquet")
    incoming = project / "incoming"
    incoming.mkdir()
    fresh = make_imageset(n_per_class=3, n_classes=10, size=32, seed=7, prefix="batch1")
    write_dataset(fresh, incoming / "2026-11-24.parquet")
    # the second batch re-sends 5 samples of the base (same content, new ids) and brings 10 new ones
    more = make_imageset(n_per_class=1, n_classes=10, size=32, seed=8, prefix="batch2")
    resent = base.subset(np.arange(5))
    from incompat.data import ImageSet

    second = ImageSet(np.concatenate([resent.images, more.images]), np.concatenate([resent.labels, more.labels]),
                      [f"resent-{i}" for i in range(5)] + list(more.sample_ids), base.class_names)
    write_dataset(second, incoming / "2026-11-25.parquet")
    (incoming / ".upload.part").write_text("half a file")
    return base, incoming


def test_sanitize_flow_merges_incoming_batches_into_a_new_version(project, step_calls, capsys):
    base, incoming = _incoming(project)
    assert main(["sanitize", "train.parquet", "--incoming", "incoming", "--out", "sanitized", "--versioned",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    version = (project / "sanitized" / "LATEST").read_text().strip()
    assert version == result["version"] and version.startswith("v-")
    run = project / "sanitized" / version
    merged = read_dataset(run / "dataset.parquet", verify=True)
    assert len(merged) == len(base) + 30 + 10  # the 5 re-sent samples are not doubled
    manifest = json.loads((run / "ingest.json").read_text())
    assert manifest["summary"]["n_duplicates"] == 5
    assert {d["duplicate_of"] for d in manifest["summary"]["duplicates"]} == set(base.sample_ids[:5])
    record = json.loads((run / "lineage.json").read_text())
    roles = [(s["role"], s["path"].rsplit("/", 1)[-1]) for s in record["sources"]]
    assert roles == [("base", "train.parquet"), ("incoming", "2026-11-24.parquet"),
                     ("incoming", "2026-11-25.parquet")]
    assert record["n_duplicates_at_ingest"] == 5
    assert result["n_samples"] == len(merged)
    for name in ("clean.parquet", "removed.parquet", "scores.parquet", "metrics.json", "report.html"):
        assert (run / name).exists()

    step_calls.clear()
    assert main(["sanitize", "train.parquet", "--incoming", "incoming", "--out", "sanitized", "--versioned",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == version
    assert step_calls == []  # the same inputs again: served from cache


def test_sanitize_refuses_a_batch_reusing_an_id_for_other_content(project, capsys):
    incoming = project / "incoming"
    incoming.mkdir()
    clash = make_imageset(n_per_class=1, n_classes=10, size=32, seed=9, prefix="train")  # ids train-0000...
    write_dataset(clash, incoming / "b.parquet")
    assert main(["sanitize", "train.parquet", "--incoming", "incoming", "--out", "out"]) == 1
    err = capsys.readouterr().err
    assert "b.parquet row 0" in err and "train-0000" in err
    assert not (project / "out" / "clean.parquet").exists()


def test_merge_keeps_the_first_copy_and_checks_classes():
    a = make_imageset(n_per_class=2, n_classes=3, size=8, prefix="a")
    merged, report = engine_steps.merge([("a", a), ("again", a.subset(np.arange(2)))])
    assert len(merged) == len(a) and len(report["duplicates"]) == 2
    other = make_imageset(n_per_class=2, n_classes=4, size=8, prefix="b")
    with pytest.raises(DataError, match="class names or image shape differ"):
        engine_steps.merge([("a", a), ("b", other)])


def _sanitize_runs(uri) -> list:
    return [r for r in _runs(uri)[1] if r.data.tags.get("incompat.flow") == "sanitize"]


def test_nightly_deployment_runs_its_flow_with_its_parameters(project, step_calls, mlflow_store):
    """prefect.yaml's nightly deployment, run as a flow with exactly its parameters (no scheduler): nothing to do
    without a batch, one run per new batch, and never two runs at once."""
    from pathlib import Path

    import importlib

    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    config = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    deployment = next(d for d in config["deployments"] if d["name"] == "nightly-sanitize")
    assert deployment["schedules"][0]["cron"] and deployment["work_pool"]["name"]
    assert deployment["concurrency_limit"]["limit"] == 1
    assert ConcurrencyLimitStrategy(deployment["concurrency_limit"]["collision_strategy"])
    module_path, flow_name = deployment["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module_path[:-3].replace("/", ".")), flow_name)
    p = deployment["parameters"]
    # nothing dropped yet: the nightly run does nothing
    Path(p["incoming"]).mkdir(parents=True)
    Path(p["dataset"]).parent.mkdir(parents=True)
    shutil.copy("train.parquet", p["dataset"])
    assert flow(**p)["status"] == "no new data"
    assert step_calls == []
    write_dataset(make_imageset(n_per_class=2, n_classes=10, size=32, seed=5, prefix="nightly"),
                  Path(p["incoming"]) / "batch.parquet")
    result = flow(**p)
    assert result["status"] == "sanitized"
    assert (Path(p["out"]) / "LATEST").read_text().strip() == result["version"]
    assert result["filter"]["n_samples"] == 320
    # the next night, the same batch: no steps, no MLflow run, no new version
    versions = sorted(Path(p["out"]).glob("v-*"))
    assert len(_sanitize_runs(mlflow_store)) == 1 and len(versions) == 1
    step_calls.clear()
    assert flow(**p)["status"] == "no new data"
    assert step_calls == [] and len(_sanitize_runs(mlflow_store)) == 1
    assert sorted(Path(p["out"]).glob("v-*")) == versions
    # a new batch: a new version of the base and both batches
    write_dataset(make_imageset(n_per_class=1, n_classes=10, size=32, seed=6, prefix="nightly2"),
                  Path(p["incoming"]) / "batch2.parquet")
    newer = flow(**p)
    assert newer["status"] == "sanitized" and newer["version"] != result["version"]
    assert newer["filter"]["n_samples"] == 330 and len(_sanitize_runs(mlflow_store)) == 2
    grid = next(d for d in config["deployments"] if d["name"] == "paper-grid")
    module_path, flow_name = grid["entrypoint"].split(":")
    assert getattr(importlib.import_module(module_path[:-3].replace("/", ".")), flow_name).name == "grid"


def test_io_errors_are_retried_and_data_errors_are_not(project, monkeypatch):
    from flows.evaluate import evaluate
    from tasks import steps as prefect_steps

    monkeypatch.setattr(prefect_steps.report, "retry_delay_seconds", [0, 0])
    original, attempts = engine_steps.run_report, []

    def flaky(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk briefly unavailable")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_steps, "run_report", flaky)
    evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    assert len(attempts) == 2

    attempts.clear()

    def bad(*args, **kwargs):
        attempts.append(1)
        raise DataError("scores.parquet row 3: broken")

    monkeypatch.setattr(engine_steps, "run_report", bad)
    (project / "data" / "reports" / "report.html").unlink()  # not served from cache
    with pytest.raises(DataError, match="row 3"):
        evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    assert len(attempts) == 1


def _flow_run_and_artifacts(flow_run_id: str):
    """The flow run and its artifacts by key, read back through the Prefect client."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return run, {a.key: a for a in artifacts if a.key}  # keyless: Prefect's own result artifacts


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_evaluate_flow_run_is_named_publishes_artifacts_and_keeps_a_json_result(project, mlflow_store):
    import datetime

    from flows.evaluate import evaluate

    result = evaluate(params_path="params.yaml", data_dir="data", retrain=False)
    run, artifacts = _flow_run_and_artifacts(result["prefect_flow_run_id"])
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert run.name.startswith("evaluate paper:100:15 ") and today in run.name
    assert set(artifacts) == {"evaluate-removed-per-class", "evaluate-summary", "evaluate-report",
                              "evaluate-mlflow-run"}
    metrics = json.loads((project / "data" / "clean" / "metrics.json").read_text())
    rows = _table(artifacts["evaluate-removed-per-class"])
    assert len(rows) == 10 and sum(r["samples"] for r in rows) == 200
    assert sum(r["removed"] for r in rows) == result["filter"]["n_removed"]
    assert sum(r["poison"] for r in rows) == 2  # ground truth known: the detection per class
    assert sum(r["poison_removed"] for r in rows) == metrics["poison_removed"]
    summary = artifacts["evaluate-summary"].data
    assert "poison removed" in summary and result["mlflow_run_id"] in summary
    assert "report.html" in artifacts["evaluate-report"].data
    assert f"/runs/{result['mlflow_run_id']}" in artifacts["evaluate-mlflow-run"].data
    # the flow's own result is persisted as JSON, not as a pickle
    stored = run.state.data
    meta = stored.metadata if hasattr(stored, "metadata") else stored
    assert meta.serializer.type == "json"
    stored_file = Path(meta.storage_key)
    assert json.loads(stored_file.read_bytes())["filter"]["n_removed"] == result["filter"]["n_removed"]
