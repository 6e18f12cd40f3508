"""The `grid` flow: many scenarios end to end (poison -> cluster -> filter -> retrain -> evaluate), gathered
into one table (CSV + Markdown) and one MLflow parent run with a nested run per scenario.

Each scenario is one independent Prefect task, so a task runner can spread them: one at a time by default, a
local Dask cluster with `workers > 1`, or an existing Dask cluster (`dask_address`). Workers only compute and
write files under their scenario's folder; MLflow is written by the flow itself, after the results come back,
so two grids (or many workers) never write to the store at once from different places.
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, task

from flows.running import flow_run_id, run_step
from incompat import lineage, steps
from incompat.config import load_params
from incompat.files import write_text_atomic
from tasks import steps as t
from tasks.artifacts import publish_grid
from tasks.tracking import Tracker, params_in_use

COLUMNS = ["scenario", "method", "poison_total", "poison_removed", "clean_removed", "clean_removed_fraction",
           "asr_before", "asr_after", "acc_before", "acc_after", "tm_before", "tm_after", "wall_seconds",
           "epoch_equivalents"]


def scenario_list(scenarios: list[str] | None, paper_seed: int | None, ids: list[int] | None) -> list[str]:
    if scenarios:
        return list(scenarios)
    return [f"paper:{paper_seed}:{i}" for i in (ids if ids is not None else range(24))]


# One retry, on I/O errors only (a scenario on a busy or briefly gone disk); a bad scenario or bad data fails at once.
@task(name="scenario", version=t.STEP_VERSION, cache_policy=t.STEP_CACHE, persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=5, retry_condition_fn=t._io_error)
def run_scenario(root: str, raw_dir: str, raw_digests: list[str], scenario: str, params_path: str,
                 params_digest: str, retrain: bool = True, threads: int | None = None) -> dict:
    """One scenario in its own folder; the ingested data is shared (hard links, read only)."""
    import time

    import torch

    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    layout = steps.Layout(root)
    layout.raw.mkdir(parents=True, exist_ok=True)
    for name in ("train.parquet", "test.parquet"):
        source, target = Path(raw_dir) / name, layout.raw / name
        if source.exists() and not target.exists():
            try:
                os.link(source, target)
            except OSError:  # another file system: copy
                import shutil

                shutil.copyfile(source, target)
    params = load_params(params_path)
    poisoned = steps.run_poison(layout, scenario)
    steps.run_cluster(layout, params)
    sanitized = steps.run_filter(layout, params, run_context={"grid_scenario": scenario})
    evaluation = {}
    if retrain:
        steps.run_retrain(layout, params)
        evaluation = steps.run_evaluate(layout, params)
    row = table_row(poisoned["scenario"], sanitized, evaluation)
    outputs = [ref for ref in sanitized["outputs"]] + evaluation.get("outputs", [])
    return {"row": row, "root": root, "outputs": outputs,
            "timing": {"pid": os.getpid(), "start": started, "end": time.time(), "max_rss_mib": _max_rss_mib()}}


def table_row(scenario: str, m: dict, ev: dict) -> dict:
    return {"scenario": scenario, "method": "ispl", "poison_total": m.get("poison_total"),
            "poison_removed": m.get("poison_removed"), "clean_removed": m.get("clean_removed"),
            "clean_removed_fraction": m.get("clean_removed_fraction"),
            "asr_before": ev.get("attack_success_rate_before"), "asr_after": ev.get("attack_success_rate_after"),
            "acc_before": ev.get("clean_accuracy_before"), "acc_after": ev.get("clean_accuracy_after"),
            "tm_before": ev.get("targeted_misclassification_before"),
            "tm_after": ev.get("targeted_misclassification_after"),
            "wall_seconds": m.get("wall_seconds"), "epoch_equivalents": m.get("epoch_equivalents")}


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = out_dir / "grid.csv", out_dir / "grid.md"
    write_text_atomic(csv_path, buffer.getvalue())

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    write_text_atomic(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def run_name() -> str:
    """`grid <n> scenarios <UTC time>` (n: the scenarios given, else the paper's ids asked for)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    ids = parameters.get("ids")
    count = len(parameters.get("scenarios") or (ids if ids is not None else range(24)))
    return f"grid {count} scenarios {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


# The summary is rows of numbers, paths and timings: JSON, not a pickle (reading it must not run code).
@flow(name="grid", version=t.STEP_VERSION, flow_run_name=run_name, persist_result=True, result_serializer="json")
def grid(scenarios: list[str] | None = None, paper_seed: int | None = 100, ids: list[int] | None = None,
         out: str = "data/grid", params_path: str = "params.yaml", retrain: bool = True,
         experiment: str = "incompat", threads_per_scenario: int | None = None) -> dict:
    params = load_params(params_path)
    names = scenario_list(scenarios, paper_seed, ids)
    out_dir = Path(out).resolve()
    shared = steps.Layout(out_dir)
    p = params.ingest
    ingested = run_step(t.ingest, root=str(out_dir), flat=False, ingest_params=p.__dict__, sources=[p.source],
                        source_digests=[lineage.digest(p.source)], test_source=p.test_source,
                        test_digest=lineage.digest(p.test_source),
                        subset=p.subset)
    raw_digests = [ref["digest"] for ref in ingested["outputs"]]
    params_digest = lineage.file_sha256(params_path)

    def kwargs_of(name: str) -> dict:
        return dict(root=str(out_dir / "scenarios" / _folder(name)), raw_dir=str(shared.raw), raw_digests=raw_digests,
                    scenario=name, params_path=str(Path(params_path).resolve()), params_digest=params_digest,
                    retrain=retrain, threads=threads_per_scenario)

    import time

    submitted = time.time()
    futures = [run_scenario.submit(**kwargs_of(name)) for name in names]
    results = [future.result() for future in futures]
    gathered = time.time()
    # a cached scenario whose files were changed or removed since is computed again
    for i, (name, result) in enumerate(zip(names, results)):
        if not t.outputs_intact(result):
            results[i] = run_scenario.with_options(refresh_cache=True).submit(**kwargs_of(name)).result()
    rows = [r["row"] for r in results]
    csv_path, md_path = write_table(rows, out_dir)
    tracker = Tracker(experiment)
    with tracker.run(f"grid {len(names)} scenarios", tags={"incompat.flow": "grid",
                                                          "prefect.flow_run_id": flow_run_id() or ""}):
        tracker.log_params(params_in_use(params, ("ingest", "train", "defense"), scenarios=names,
                                         retrain=retrain))
        for r in results:
            child_id = tracker.nested_run(r["row"]["scenario"], tags={"incompat.kind": "scenario"})
            tracker.log_metrics({k: v for k, v in r["row"].items() if k not in ("scenario", "method")},
                                run_id=child_id)
            tracker.client.log_artifact(child_id, str(Path(r["root"]) / "clean" / "lineage.json"))
            tracker.client.set_terminated(child_id, "FINISHED")
        tracker.log_artifact(csv_path)
        tracker.log_artifact(md_path)
        publish_grid(rows, tracker, csv_path)
    summary = {"rows": rows, "csv": str(csv_path), "markdown": str(md_path), "mlflow_run_id": tracker.run_id,
               "prefect_flow_run_id": flow_run_id(),
               "timing": {"submitted": submitted, "gathered": gathered,
                          "scenarios": [r.get("timing") for r in results]}}
    write_text_atomic(out_dir / "grid.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _folder(scenario: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scenario)


def task_runner(workers: int = 1, dask_address: str | None = None, memory_limit: str = "4GiB"):
    """Where the scenarios run: one at a time in this process (workers=1), a local Dask cluster of `workers`
    single-threaded processes, or an existing Dask cluster. Each worker holds one decoded copy of the dataset
    (CIFAR-10: ~150 MB train + 30 MB test, ~1.2 GB peak while training the small CNN): the 4 GiB limit leaves
    room for ResNet-sized models; Dask restarts a worker that goes past it and its scenario is retried."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        from prefect_dask import DaskTaskRunner

        # preload: each worker imports torch and the engine when it starts, not inside its first scenario
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "memory_limit": memory_limit, "dashboard_address": None,
                                              "preload": ["flows.grid"]})
    return ThreadPoolTaskRunner(max_workers=1)


def run_grid(workers: int = 1, dask_address: str | None = None, memory_limit: str = "4GiB", **kwargs) -> dict:
    """The grid flow on the chosen task runner (threads per scenario: the machine's cores shared out)."""
    if kwargs.get("threads_per_scenario") is None and (workers > 1 and not dask_address):
        kwargs["threads_per_scenario"] = max(1, (os.cpu_count() or 1) // workers)
    flow_ = grid.with_options(task_runner=task_runner(workers, dask_address, memory_limit))
    local_dask = (workers > 1 and not dask_address) or (dask_address and _is_loopback(dask_address))
    with _one_api_for_local_workers(bool(local_dask)):
        return flow_(**kwargs)


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


@contextmanager
def _one_api_for_local_workers(local: bool):
    """Dask workers on this machine report to this process's temporary Prefect server. Without an API URL each
    worker process starts a temporary server of its own (task runs take the flow's settings with them, and those
    name none): one more server per worker, and an orphaned one, left running, for every worker killed mid-grid.
    Remote workers cannot reach 127.0.0.1: they need PREFECT_API_URL, as the README says."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not local or PREFECT_API_URL.value():
        yield
        return
    # Without an API URL, Prefect's public client starts (or reuses) this process's temporary server, the one the
    # flow's own client talks to; its address is the client's API URL.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield
