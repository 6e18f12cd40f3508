"""Prefect's settings for this project, applied before Prefect is imported.

Without PREFECT_API_URL, flows run on Prefect's temporary local server, with its database and the task results
(the cache) under the project's .prefect/; with PREFECT_API_URL set, against that server. What the user set
always wins. Prefect's run logs go to its API (the UI) at INFO while its console handler stays quiet unless
verbose; MLflow's HTTP client gets timeouts short enough that a dead tracking server fails the run in about a
minute rather than a quarter of an hour.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure(project_dir: str | os.PathLike | None = None, verbose: bool = False) -> None:
    home = Path(os.environ.get("PREFECT_HOME") or Path(project_dir or os.getcwd()) / ".prefect")
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the temporary server's 20 s default is tight on a busy 2-core machine
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Run logs reach the API (the UI's log tab) at INFO; only the console is quiet: the CLI reports a failure
        # as one line on stderr, where Prefect would add its state lines and traceback (--debug shows them).
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "NOTSET" if verbose else "CRITICAL",
        "PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL": "NOTSET" if verbose else "CRITICAL",
        "PREFECT_TASKS_REFRESH_CACHE": "false",
        "MLFLOW_LOGGING_LEVEL": "DEBUG" if verbose else "ERROR",
        # MLflow's defaults (120 s per request, 7 retries with doubling backoff) turn a tracking server that dies
        # mid-run into a quarter of an hour of silence; this fails within about a minute
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    home.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.pop("PREFECT_API_URL", None)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
