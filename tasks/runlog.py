"""What a flow run tells Prefect's UI about its steps, and how a step served from cache is recognised.

Log lines go through Prefect's run logger, so they are stored with the flow run (the UI's log tab, `prefect
flow-run logs`); the console shows them only with `--debug` (tasks/runtime.py quiets Prefect's console handler).
"""

from __future__ import annotations

import logging
import time

from tasks import lifecycle


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's logger for the current flow or task run; outside a run, a plain one (nothing to attach to)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("incompat.flows")


def summary(result: dict, limit: int = 8) -> str:
    """The step's headline numbers (counts, fractions), not its file list."""
    items = [(k, v) for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
             and k not in ("cached",) and not (isinstance(v, str) and len(v) > 80)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def call_step(step_task, **kwargs) -> dict:
    """Call a step task; its result gets `cached: True` when Prefect served it from cache (the numbers in it,
    the defense's wall time among them, are then the first run's)."""
    from prefect.runtime import flow_run

    lifecycle.note_flow_run(flow_run.id)
    logger = run_logger()
    logger.info("%s: started", step_task.name)
    start = time.monotonic()
    state = step_task(**kwargs, return_state=True)
    result = state.result()  # raises the step's error, as calling the task would
    cached = state.is_completed() and state.name == "Cached"
    if cached and isinstance(result, dict):
        result = {**result, "cached": True}
    logger.info("%s: %s in %.1f s%s", step_task.name, "served from cache" if cached else "done",
                time.monotonic() - start, f" ({summary(result)})" if isinstance(result, dict) else "")
    return result
