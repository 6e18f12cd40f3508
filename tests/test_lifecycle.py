"""A flow command run as a user, a scheduler or a Prefect worker runs it: as a real subprocess, without a terminal.

- SIGINT to the process group (Ctrl-C), SIGTERM to it (`timeout`, systemd, a worker cancelling) or SIGTERM to the
  process alone (`kill PID`) stops it within 5 s with one line on stderr, the MLflow run marked KILLED and no
  process of ours left (Prefect's temporary server included); the same command then resumes and finishes.
- Without a terminal, progress comes as plain lines; Prefect's run logs reach its API (the UI) and not the
  console; a rerun served from Prefect's cache says so instead of repeating the first run's defense time.
"""

import os
import re
import shutil
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

# six weak learners: long enough to be caught mid-clustering, short enough for a rerun to finish in seconds
PROFILE = {**TINY_PROFILE, "boost": 6, "data_fraction": 0.8, "core_epochs": 6, "refinement_rounds": 2,
           "allow_class_loss": True}
CLI = str(Path(sys.executable).with_name("incompat"))
COMMAND = [CLI, "sanitize", "train.parquet", "--out", "run", "--params", "params.yaml"]
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d (weak learners|refinement|train \S+): ")


@pytest.fixture
def project(tmp_path, _mlflow_template):
    root = tmp_path / "project"
    root.mkdir()
    write_dataset(make_imageset(n_per_class=40, n_classes=10, size=32, prefix="train"), root / "train.parquet")
    params = {"defense": {"profile": "slow"}, "defense_profiles": {"slow": PROFILE}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(_mlflow_template, root / "mlflow.db")
    return root


def _env(root: Path, **extra) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _sanitize_runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`incompat.flow` = 'sanitize'")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Collect:
    """Reads a pipe as it fills, so the child never blocks on a full pipe."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to the group", "SIGTERM to the process"])
def test_a_signal_stops_the_run_in_seconds_with_one_line_and_nothing_left_and_a_rerun_resumes(how, project):
    env = _env(project, INCOMPAT_PROGRESS_SECONDS="3600")  # progress: only the phases' start lines
    proc = subprocess.Popen(COMMAND, cwd=project, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = _Collect(proc.stderr)
    checkpoint = project / "run" / "checkpoints" / "learner-b00-00.npz"
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, f"the run ended before its first learner: {stderr.lines[-20:]}"
            assert time.monotonic() < deadline, "no learner checkpoint within 300 s"
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "Prefect's temporary server should be running below the command"
        sig = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
        sent = time.monotonic()
        if how.endswith("group"):
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{how}: still running 5 s later")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr.thread.join(5)
    assert rc == 128 + sig, (rc, stderr.lines)
    said = [line for line in stderr.lines if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(said) == 1, said
    assert said[0].startswith(f"incompat sanitize: stopped by {sig.name}") and "KILLED" in said[0], said
    assert took < 5

    time.sleep(0.5)  # the children's exit statuses to be collected by whoever adopted them
    left = [p for p in family if _alive(p)]
    assert not left, f"{how}: left running: {[(p.pid, p.cmdline()) for p in left]}"
    runs = _sanitize_runs(project)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not (project / "run" / "clean.parquet").exists()

    done = subprocess.run(COMMAND, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("removed ")
    assert (project / "run" / "clean.parquet").exists()
    assert sorted(r.info.status for r in _sanitize_runs(project)) == ["FINISHED", "KILLED"]


def _flow_run_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_without_a_terminal_progress_comes_as_lines_logs_reach_prefect_and_a_cached_rerun_says_so(project):
    env = _env(project, INCOMPAT_PROGRESS_SECONDS="0")  # every update: the test cannot wait 30 s per line
    first = subprocess.run(COMMAND, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    progress = [line for line in first.stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert any(line.endswith("weak learners: started (0/6, 0%)") for line in progress), progress
    assert any(re.search(r"weak learners: \d/6, \d+%, \d+ s elapsed", line) for line in progress), progress
    assert any("weak learners: finished" in line for line in progress), progress
    assert any("refinement: finished" in line for line in progress), progress
    # nothing of Prefect's on the console (its state lines, its INFO lines): those belong to its UI
    noise = [line for line in first.stderr.splitlines() if not PROGRESS_LINE.match(line)
             and ("prefect" in line.lower() or " | INFO" in line or "Finished in state" in line)]
    assert not noise, noise
    assert re.match(r"removed \d+ of 400 samples \([\d.]+%\); defense \d+ s,", first.stdout), first.stdout
    flow_run_id = re.search(r"Prefect run:\s+(\S+)", first.stdout).group(1)

    again = subprocess.run(COMMAND, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "defense served from cache (first run " in again.stdout.splitlines()[0], again.stdout
    assert not [line for line in again.stderr.splitlines() if "weak learners: started" in line]

    messages = _flow_run_logs(flow_run_id)
    for expected in ("ingest: started", "cluster: started", "cluster: done in", "filter: done in"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert any("n_removed=" in m for m in messages), messages


def test_line_progress_writes_at_most_one_line_per_interval_plus_start_and_end(monkeypatch):
    """Ten minutes of updates every second at the default 30 s interval: 20 lines between start and end, not 600."""
    import io

    from incompat import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.delenv("INCOMPAT_PROGRESS_SECONDS", raising=False)
    out = io.StringIO()
    bar = progress.LineProgress(total=600, desc="weak learners", stream=out)
    for _ in range(600):
        clock[0] += 1
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("weak learners: started (0/600, 0%)")
    assert lines[-1].endswith("weak learners: finished (600/600, 100%) in 10 min 00 s")
    assert len(lines) == 2 + 19  # at 30 s, 60 s, ... 570 s; the end line stands for 600 s
    assert "weak learners: 300/600, 50%, 5 min 00 s elapsed, about 5 min 00 s left" in out.getvalue()


def test_progress_is_lines_without_a_terminal_and_a_bar_on_one(monkeypatch):
    import io

    from incompat import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    assert isinstance(progress.progress(True, 10, "x"), progress.LineProgress)
    assert progress.progress(False, 10, "x").disable
    monkeypatch.setattr(progress.sys, "stderr", Terminal())
    assert not isinstance(progress.progress(True, 10, "x"), progress.LineProgress)
