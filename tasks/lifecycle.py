"""Stopping a flow run cleanly on SIGINT / SIGTERM, whoever sends it (Ctrl-C to the process group, `timeout`,
systemd, a Prefect worker cancelling, `kill PID`).

Left to themselves, Prefect and MLflow stop badly: a signal to the whole group also stops Prefect's temporary
local server, and the flow engine then retries reporting the crash to that dead server for over a minute before
it ends in a long `httpx.ConnectError` traceback; SIGTERM to this process alone kills it at once and leaves the
server running, orphaned. Here a signal

1. raises `Stopped` (a KeyboardInterrupt) in the main thread, so the run unwinds: Prefect reports the crash
   while its server still answers, the MLflow run is ended, outputs being written are abandoned (they are
   written to temporary names and renamed, so nothing half-written stays);
2. starts a watchdog that does not wait for that longer than `STOP_GRACE_SECONDS`, nor at all once the
   temporary server is gone (nothing can be reported any more);
3. then, in whichever thread gets there first, `stop_now` marks the MLflow run KILLED, ends every process this
   one started (the temporary server, Dask workers), prints one line and exits 128 + the signal number.

A rerun of the same command resumes: finished steps come from Prefect's cache, finished weak learners from
their checkpoints.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

# Prefect needs well under a second to report a crash to a server that answers; past this, it is retrying one
# that does not, and the user waits for nothing.
STOP_GRACE_SECONDS = 1.5
# how long processes we started get to exit on SIGTERM before SIGKILL, and MLflow to mark the run
CHILD_EXIT_SECONDS = 0.5
MLFLOW_MARK_SECONDS = 1.5

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when SIGINT or SIGTERM arrives during a flow command."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    command = "incompat"
    signum: int | None = None
    handled = 0  # signals our Python-level handler has seen
    signalled_at: float | None = None
    installed: dict | None = None
    wakeup_fds: tuple[int, int] | None = None
    previous_wakeup_fd = -1
    flow_run_ids: set[str] = set()
    mlflow_run_ids: set[str] = set()
    stopping = threading.Lock()
    notice = threading.Event()


_state = _State()


def stop_requested() -> bool:
    return _state.signum is not None


def note_flow_run(flow_run_id: str | None) -> None:
    """The flow run whose MLflow run (tagged `prefect.flow_run_id`) is to be marked KILLED if we are stopped."""
    if flow_run_id:
        _state.flow_run_ids.add(str(flow_run_id))


def note_mlflow_run(run_id: str | None) -> None:
    if run_id:
        _state.mlflow_run_ids.add(str(run_id))


def install(command: str) -> None:
    """Take over SIGINT and SIGTERM for the rest of this command (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread() or _state.installed is not None:
        return
    _state.command = command
    _state.signum = _state.signalled_at = None
    _state.handled = 0
    _state.notice.clear()
    _state.installed = {sig: signal.signal(sig, _on_signal) for sig in HANDLED}
    # The C-level handler writes the signal number to this pipe at once, even while the main thread is busy in
    # a long native call (or Prefect's own SIGTERM handler is the Python one): the watchdog starts counting then.
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        _state.previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        os.close(read_fd)
        os.close(write_fd)
    else:
        _state.wakeup_fds = (read_fd, write_fd)
    threading.Thread(target=_watchdog, name="incompat-stop-watchdog", daemon=True).start()


def uninstall() -> None:
    """Give SIGINT / SIGTERM back (an in-process caller, such as a test, keeps its own handlers)."""
    if _state.installed is None:
        return
    for sig, handler in _state.installed.items():
        signal.signal(sig, handler)
    _state.installed = None
    if _state.wakeup_fds is not None:
        signal.set_wakeup_fd(_state.previous_wakeup_fd)
        _, write_fd = _state.wakeup_fds
        _state.wakeup_fds = None
        os.close(write_fd)  # the reader's os.read(read_fd) returns b"" and it ends
    _state.notice.set()


def _begin(signum: int) -> None:
    if _state.signum is None:
        _state.signum = signum
        _state.signalled_at = time.monotonic()
    _state.notice.set()


def _on_signal(signum, frame):
    _state.handled += 1
    _begin(signum)
    if _state.handled > 1:  # a second signal (or Prefect passing its SIGTERM on after reporting): no more waiting
        stop_now()
    raise Stopped(signum)


def _watchdog() -> None:
    fds = _state.wakeup_fds
    if fds is not None:
        reader = threading.Thread(target=_read_wakeups, args=(fds[0],), name="incompat-signal-reader", daemon=True)
        reader.start()
    while True:
        _state.notice.wait()
        if _state.installed is None and _state.signum is None:
            return  # uninstalled without a signal
        if _state.signum is not None:
            break
        _state.notice.clear()
    deadline = (_state.signalled_at or time.monotonic()) + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and not _server_gone():
        time.sleep(0.05)
    stop_now()


def _read_wakeups(read_fd: int) -> None:
    try:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                break
            for signum in data:
                if signum in HANDLED:
                    _begin(signum)
    except OSError:
        pass
    finally:
        try:
            os.close(read_fd)
        except OSError:
            pass


def _prefect_servers() -> list:
    module = sys.modules.get("prefect.server.api.server")
    if module is None:
        return []
    return [s.server_process for s in list(module.SubprocessASGIServer._instances.values())
            if getattr(s, "server_process", None) is not None]


def _server_gone() -> bool:
    """Prefect's temporary server stopped too (the signal went to the whole group): no crash report can land."""
    return any(proc.poll() is not None for proc in _prefect_servers())


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below `pid` (default: this one), from /proc, else psutil, else the Prefect server."""
    pid = os.getpid() if pid is None else pid
    if Path("/proc/self/stat").exists():
        children, found, todo = _children_of(), [], [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return [proc.pid for proc in _prefect_servers() if proc.poll() is None]


def _end_processes(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + CHILD_EXIT_SECONDS
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:  # reap our own children; grandchildren are reaped by whoever adopts them
        try:
            os.waitpid(pid, os.WNOHANG)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _mark_mlflow_killed() -> list[str]:
    """End this command's MLflow runs as KILLED (RUNNING, or FAILED by the unwinding just now)."""
    if "mlflow" not in sys.modules:
        return []
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    run_ids = set(_state.mlflow_run_ids)
    if _state.flow_run_ids:
        experiments = [e.experiment_id for e in client.search_experiments()]
        for flow_run_id in _state.flow_run_ids:
            found = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=50)
            run_ids.update(r.info.run_id for r in found)
    marked = []
    for run_id in run_ids:
        if client.get_run(run_id).info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run_id, "KILLED")
            marked.append(run_id)
    return marked


def stop_now() -> None:
    """Mark the MLflow run KILLED, end our processes, print one line, exit 128 + signal. Never returns."""
    if not _state.stopping.acquire(blocking=False):
        while True:  # another thread is already doing it and will exit the process
            time.sleep(1)
    signum = _state.signum or signal.SIGINT
    marked: list[str] = []
    errors: list[str] = []

    def mark():
        try:
            marked.extend(_mark_mlflow_killed())
        except Exception as exc:  # the store may be the thing that is gone
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    marker = threading.Thread(target=mark, daemon=True)
    marker.start()
    try:
        _end_processes(descendants())
    except Exception:
        pass
    marker.join(MLFLOW_MARK_SECONDS)
    if marked:
        mlflow_note = f"MLflow run {', '.join(sorted(marked))} marked KILLED"
    elif errors:
        mlflow_note = f"MLflow run not marked ({errors[0][:120]})"
    else:
        mlflow_note = "no MLflow run to mark"
    line = (f"incompat {_state.command}: stopped by {signal.Signals(signum).name}; {mlflow_note}; "
            f"run the same command again to resume\n")
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(128 + signum)
