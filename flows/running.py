"""What every flow does around its tasks: run a step and make sure a cached result still matches the files,
and log a finished run's files to MLflow."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from incompat.data import DataError
from incompat.steps import Layout

log = logging.getLogger("incompat.flows")


def run_step(step_task, **kwargs) -> dict:
    """Call a task; when Prefect served it from cache but its files were changed or removed since, run it again
    (refresh_cache) instead of handing stale paths downstream."""
    from tasks.runlog import call_step
    from tasks.steps import outputs_intact

    result = call_step(step_task, **kwargs)
    if not outputs_intact(result):
        log.warning("%s: cached outputs changed on disk; running the step again", step_task.name)
        result = call_step(step_task.with_options(refresh_cache=True), **kwargs)
    return result


def flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def log_sanitization(tracker, layout: Layout, source_paths: list[str]) -> None:
    """Per-round curves and nested learner runs, the final metrics, dataset inputs with digests, and the
    artifacts (removed-sample manifest, lineage, metrics, report). Datasets are inputs by reference (location and
    digest), never artifacts: a run folder's parquet files and checkpoints stay out of the store."""
    from tasks.tracking import removed_manifest

    tracker.log_rounds(layout.rounds)
    metrics = json.loads(layout.metrics.read_text())
    # numbers only, whatever else metrics.json holds; per-class counts are read from removed.parquet, by index
    tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("removed_per_class")})
    tracker.log_removed_per_class(layout.removed)
    for i, source in enumerate(source_paths):
        path = Path(source)
        if path.suffix == ".parquet":
            try:
                tracker.log_dataset(path, "source" if i == 0 else "incoming")
            except DataError:  # a raw (non-canonical) parquet: it is logged through the ingested copy below
                pass
    tracker.log_dataset(layout.raw_train, "ingested")
    if layout.poisoned_train.exists() and layout.sanitized_input() == layout.poisoned_train:
        tracker.log_dataset(layout.poisoned_train, "poisoned")
    tracker.log_dataset(layout.clean, "cleaned")
    tracker.log_dataset(layout.removed, "removed")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = removed_manifest(layout.removed, Path(tmp) / "removed_samples.csv")
        for path in (manifest, layout.lineage, layout.metrics, layout.curves):
            if path.exists():
                tracker.log_artifact(path, "sanitization")
    if layout.report_html.exists():
        tracker.log_report(layout.report_html)
