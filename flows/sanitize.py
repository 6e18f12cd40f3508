"""The `sanitize` flow: a user's dataset (no ground truth), optionally plus new batches dropped into an incoming
location: ingest (merge, duplicates reported) -> cluster -> filter -> report, as one MLflow run.

Everything of a run lands in one folder: dataset.parquet (the merged input), scores.parquet, clean.parquet,
removed.parquet, metrics.json, lineage.json, report.html and the step manifests. Versioned output: with
`versioned=True` (the nightly deployment) every distinct input + parameters + code
combination gets its own folder `OUT/v-<key>/`, and `OUT/LATEST` names the newest; the same inputs again land in
the same folder and are served from Prefect's cache.

Every batch of a successful run is recorded by content digest in `OUT/processed.json`. With
`skip_when_no_incoming` (the nightly deployment) a run whose batches are all recorded does nothing: no steps, no
MLflow run, no new version. A new batch makes a new version of the base plus every batch so far.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from flows.running import flow_run_id, log_sanitization, run_step
from incompat import lineage
from incompat.config import load_params
from incompat.data import DataError
from incompat.files import write_text_atomic
from incompat.steps import Layout, exclusive_run
from tasks import steps as t
from tasks.artifacts import publish_sanitization
from tasks.tracking import Tracker

BATCH_SUFFIXES = {".parquet", ".npz"}
LEDGER = "processed.json"  # in OUT: the batches already sanitized, by content digest


def incoming_batches(incoming: str | None) -> list[str]:
    """A file is one batch; a folder holds one batch per entry (a .parquet/.npz file or a dataset folder),
    taken in name order. Hidden entries and partial uploads (`*.tmp`, `*.part`) are ignored.

    Only regular files and folders are batches, and an entry of a folder must resolve inside it: a FIFO would block
    the reader forever, a link to /dev/zero never ends and a link out of the folder reads what was not dropped
    there. Such an entry is an error naming it, before anything is read."""
    import os
    import stat

    if not incoming:
        return []
    path = Path(incoming)
    if not os.path.lexists(path):
        raise DataError(f"{incoming}: incoming location does not exist")
    if stat.S_ISREG(lineage.check_regular(path, allow_dir=True).st_mode):
        return [str(path)]
    root = path.resolve()
    batches = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or entry.suffix in (".tmp", ".part"):
            continue
        if entry.suffix not in BATCH_SUFFIXES and not entry.is_dir():  # is_dir: stat only, never opens
            continue
        resolved = entry.resolve()
        if not resolved.is_relative_to(root):
            raise DataError(f"{entry}: resolves to {resolved}, outside the incoming folder {root}; refusing to "
                            "read it")
        lineage.check_regular(entry, allow_dir=True)  # names the entry as the user sees it
        batches.append(str(entry))
    return batches


def version_key(source_digests: list[str], params, code: dict) -> str:
    blob = json.dumps({"sources": source_digests, "defense": params.defense.to_dict(), "profile": params.profile,
                       "ingest": {k: v for k, v in params.ingest.__dict__.items() if k not in ("source", "test_source",
                                                                                                "subset")},
                       "engine": code["engine_sha256"]}, sort_keys=True, default=str)
    return "v-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def processed_batches(out: str | Path) -> dict:
    """The ledger of batches already sanitized into OUT: content digest -> where and when (OUT/processed.json)."""
    path = Path(out) / LEDGER
    if not path.exists():
        return {}
    try:
        ledger = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable ledger of processed batches ({exc}); move it away to start "
                        "a new one (every batch then counts as new once)") from None
    if not isinstance(ledger, dict) or not isinstance(ledger.get("batches"), dict):
        raise DataError(f"{path}: expected {{\"batches\": {{digest: ...}}}}")
    return ledger["batches"]


def record_processed(out: str | Path, batches: list[str], digests: list[str], version: str | None) -> None:
    """Add the batches of a successful run to the ledger, so that the next night without a new one does nothing."""
    ledger = processed_batches(out)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for batch, digest in zip(batches, digests):
        ledger.setdefault(digest, {"path": batch, "version": version, "processed": when})
    write_text_atomic(Path(out) / LEDGER, json.dumps({"batches": ledger}, indent=1, sort_keys=True) + "\n")


def run_name() -> str:
    """`sanitize <dataset> [+ incoming] <UTC time>`: runs told apart in Prefect's UI."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    incoming = f" + {Path(parameters['incoming']).name}" if parameters.get("incoming") else ""
    return (f"sanitize {Path(str(parameters.get('dataset', ''))).name}{incoming} "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


# The result is a small dict of counts, paths and digests: JSON, not a pickle (reading it must not run code).
@flow(name="sanitize", version=t.STEP_VERSION, log_prints=True, flow_run_name=run_name, persist_result=True,
      result_serializer="json")
def sanitize(dataset: str, out: str = "data/sanitized", incoming: str | None = None, versioned: bool = False,
             params_path: str = "params.yaml", profile: str | None = None, overrides: dict | None = None,
             truth: str | None = None, experiment: str = "incompat", progress: bool = False,
             skip_when_no_incoming: bool = False) -> dict:
    params = load_params(params_path, profile=profile, defense_overrides=overrides)
    batches = incoming_batches(incoming)
    batch_digests = [lineage.digest(b) for b in batches]
    if incoming and skip_when_no_incoming:
        done = processed_batches(out)
        if all(digest in done for digest in batch_digests):  # no batch, or every one sanitized on an earlier run
            print(f"no new batches in {incoming} ({len(batches)} already processed): nothing to sanitize")
            return {"status": "no new data", "incoming": incoming, "already_processed": batches}
    sources = [dataset] + batches
    source_digests = [lineage.digest(dataset)] + batch_digests
    out_dir = Path(out)
    version = version_key(source_digests, params, lineage.code_version()) if versioned else None
    layout = Layout(out_dir / version if version else out_dir, flat=True)
    root = str(layout.root.resolve())  # absolute: the same relative path elsewhere is other data
    tracker = Tracker(experiment)
    one_run = exclusive_run(layout, lock_dir=out_dir)  # one writer of OUT at a time; its outputs as one unit
    with one_run, tracker.run(f"sanitize {Path(dataset).name}" + (f" + {len(batches)} batch(es)" if batches else ""),
                              tags={"incompat.flow": "sanitize", "prefect.flow_run_id": flow_run_id() or "",
                                    "incompat.version_dir": root}):
        tracker.log_params({"defense": params.defense.to_dict(), "profile": params.profile, "dataset": dataset,
                            "incoming": incoming or "", "batches": batches, "versioned": versioned,
                            "ingest": params.ingest.__dict__})
        context = {"mlflow_run_id": tracker.run_id, "prefect_flow_run_id": flow_run_id()}
        ingested = run_step(t.ingest, root=root, flat=True, ingest_params=params.ingest.__dict__, sources=sources,
                            source_digests=source_digests, test_source=None, test_digest=None, subset=None)
        defense = params.defense.to_dict()
        truth_digest = lineage.digest(truth)
        dataset_digest = ingested["dataset_digest"]
        clustered = run_step(t.cluster, root=root, flat=True, defense=defense, profile=params.profile,
                             dataset_digest=dataset_digest, truth=truth, truth_digest=truth_digest,
                             progress=progress)
        filtered = run_step(t.filter_samples, root=root, flat=True, defense=defense, profile=params.profile,
                            dataset_digest=dataset_digest, scores_digest=t.digest_of(clustered, "scores"),
                            truth=truth, truth_digest=truth_digest, run_context=context)
        report = run_step(t.report, root=root, flat=True, input_digests=[
            r["digest"] for r in filtered["outputs"] + clustered["outputs"]],
            params_path=str(Path(params_path).resolve()), title=f"incompat: sanitize {Path(dataset).name}",
            truth=truth, truth_digest=truth_digest)
        log_sanitization(tracker, layout, sources)
        if version:
            write_text_atomic(out_dir / "LATEST", version + "\n")
        publish_sanitization("sanitize", f"sanitize {Path(dataset).name}" + (
            f" + {len(batches)} batch(es)" if batches else ""), layout, tracker, truth,
            extra={"version": version or "(not versioned)", "defense profile": params.profile,
                   "output folder": str(layout.root), "lineage": str(layout.lineage)})
        if batches:  # last: a run that failed before here leaves its batches new for the next one
            record_processed(out_dir, batches, batch_digests, version)
        result = {"status": "sanitized", "version": version, "ingest": ingested, "cluster": clustered,
                  "filter": filtered, "report": report, "mlflow_run_id": tracker.run_id,
                  "tracking_uri": tracker.uri, "prefect_flow_run_id": flow_run_id(),
                  "paths": {"clean": str(layout.clean), "removed": str(layout.removed),
                            "scores": str(layout.scores), "metrics": str(layout.metrics),
                            "lineage": str(layout.lineage), "report": str(layout.report_html)}}
    return result
