"""The `evaluate` flow: one scenario end to end, ingest -> poison -> cluster -> filter -> retrain -> evaluate ->
report, as one MLflow run. The default pipeline (`make run`, `incompat pipeline`) is this flow on params.yaml."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from flows.running import flow_run_id, log_sanitization, run_step
from incompat import lineage
from incompat.config import load_params
from incompat.steps import Layout, exclusive_run
from tasks import steps as t
from tasks.artifacts import publish_sanitization
from tasks.tracking import Tracker, params_in_use


def run_name() -> str:
    """`evaluate <scenario> <UTC time>`, the scenario given or params.yaml's: runs told apart in Prefect's UI."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    scenario = parameters.get("scenario")
    if not scenario:
        try:
            scenario = load_params(parameters.get("params_path", "params.yaml")).poison.scenario
        except Exception:  # a bad params file fails the flow itself, with its own message
            scenario = "params.yaml"
    return f"evaluate {scenario} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


# The result is a small dict of counts, paths and digests: JSON, not a pickle (reading it must not run code).
@flow(name="evaluate", version=t.STEP_VERSION, log_prints=True, flow_run_name=run_name, persist_result=True,
      result_serializer="json")
def evaluate(params_path: str = "params.yaml", data_dir: str = "data", profile: str | None = None,
             overrides: dict | None = None, scenario: str | None = None, experiment: str = "incompat",
             progress: bool = False, retrain: bool = True) -> dict:
    params = load_params(params_path, profile=profile, defense_overrides=overrides)
    scenario = scenario or params.poison.scenario
    layout = Layout(data_dir)
    root = str(layout.root.resolve())  # absolute: the same relative path elsewhere is other data
    tracker = Tracker(experiment)
    one_run = exclusive_run(layout)  # one writer of the data folder at a time; its outputs as one unit
    with one_run, tracker.run(f"evaluate {scenario}", tags={
            "incompat.flow": "evaluate", "incompat.scenario": scenario, "prefect.flow_run_id": flow_run_id() or ""}):
        tracker.log_params(params_in_use(params, ("ingest", "poison", "train", "defense"), scenario=scenario))
        context = {"mlflow_run_id": tracker.run_id, "prefect_flow_run_id": flow_run_id()}
        p = params.ingest
        ingested = run_step(t.ingest, root=root, flat=False, ingest_params=p.__dict__, sources=[p.source],
                            source_digests=[lineage.digest(p.source)], test_source=p.test_source,
                            test_digest=lineage.digest(p.test_source), subset=p.subset)
        poisoned = run_step(t.poison, root=root, flat=False, scenario=scenario, train_digest=ingested["dataset_digest"],
                            test_digest=t.digest_of(ingested, "test"))
        defense = params.defense.to_dict()
        dataset_digest = t.digest_of(poisoned, "train")
        truth = str(layout.truth.resolve())
        clustered = run_step(t.cluster, root=root, flat=False, defense=defense, profile=params.profile,
                             dataset_digest=dataset_digest, truth=truth, truth_digest=t.digest_of(poisoned, "truth"),
                             progress=progress)
        filtered = run_step(t.filter_samples, root=root, flat=False, defense=defense, profile=params.profile,
                            dataset_digest=dataset_digest, scores_digest=t.digest_of(clustered, "scores"),
                            truth=truth, truth_digest=t.digest_of(poisoned, "truth"), run_context=context)
        result = {"ingest": ingested, "poison": poisoned, "cluster": clustered, "filter": filtered}
        if retrain:
            models = run_step(t.retrain, root=root, flat=False, train=params.train.to_dict(),
                              clean_digest=t.digest_of(filtered, "clean"), poisoned_digest=dataset_digest,
                              progress=progress)
            evaluation = run_step(t.evaluate, root=root, flat=False,
                                  model_digests=[r["digest"] for r in models["outputs"]],
                                  test_digests=[t.digest_of(ingested, "test"),
                                                t.digest_of(poisoned, "test_triggered")])
            result.update(retrain=models, evaluation=evaluation)
            tracker.log_metrics({k: v for k, v in evaluation.items() if k != "outputs"})
        report = run_step(t.report, root=root, flat=False, input_digests=[
            r["digest"] for r in filtered["outputs"] + clustered["outputs"] + result.get("evaluation", {}).get(
                "outputs", [])], params_path=str(Path(params_path).resolve()), title=f"incompat: {scenario}")
        result["report"] = report
        log_sanitization(tracker, layout, [p.source])
        publish_sanitization("evaluate", f"evaluate {scenario}", layout, tracker, truth,
                             extra={"scenario": scenario, "defense profile": params.profile,
                                    "lineage": str(layout.lineage)})
        if retrain:
            tracker.log_model(layout.model_after, example_dataset=layout.raw_test)
        result["mlflow_run_id"] = tracker.run_id
        result["tracking_uri"] = tracker.uri
        result["prefect_flow_run_id"] = flow_run_id()
        result["paths"] = {"clean": str(layout.clean), "removed": str(layout.removed),
                           "lineage": str(layout.lineage), "report": str(layout.report_html),
                           "evaluation": str(layout.evaluation) if retrain else None}
    return result
