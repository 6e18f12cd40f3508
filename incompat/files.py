"""Crash-safe output files: write to a temporary sibling, fsync, rename into place.

A process killed mid-write (SIGKILL, power loss) leaves the previous version of the output untouched and at most a
hidden `.<name>.tmp-<host>-<pid>-<random>` sibling; the next write to the same output removes such leftovers of
processes that no longer run. A full disk is reported as OutputError(ENOSPC) naming the output, with nothing
written.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator


class OutputError(OSError):
    """An output could not be written; the previous version (if any) is intact."""


_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
# A writer that reports a failure without an errno (torch.save raises RuntimeError on a full disk) is taken to have
# hit a full disk when less than this is left on the output's file system.
_NEARLY_FULL_BYTES = 1 << 20


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of the temporary siblings that atomic_output creates for `path` in this process."""
    return f".{Path(path).name}.tmp-{_HOST_TAG}-{os.getpid()}-"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of `path` left by killed writers on this host; returns what was removed.

    Only files whose writer pid no longer runs are touched, so a concurrent writer's temp file is left alone."""
    path = Path(path)
    removed = []
    marker = f".{path.name}.tmp-{_HOST_TAG}-"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(marker)]
    except OSError:
        return removed
    for candidate in candidates:
        pid_text = candidate.name[len(marker):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # it exists (or cannot be judged): leave its file alone
    return True


def _create_temp(path: Path) -> str:
    # Not tempfile.mkstemp: its 0600 mode would make every output private; 0666 & ~umask is what open() gives.
    for _ in range(100):
        candidate = path.parent / f"{temp_prefix(path)}{secrets.token_hex(4)}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(candidate)
    raise FileExistsError(errno.EEXIST, f"{path}: cannot create a temporary file beside it")


def _disk_nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def _no_space(path: Path) -> OutputError:
    return OutputError(errno.ENOSPC, f"{path}: no space left on device; nothing was written "
                                     f"(the previous version, if any, is intact)")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    A killed process leaves at most a hidden `.<name>.tmp-*` sibling (swept by the next write to `path`), never a
    half-written `path`. Any failure removes the temporary file and leaves `path` as it was; a full disk raises
    OutputError with errno ENOSPC."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _create_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # delayed-allocation file systems report ENOSPC here
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and _disk_nearly_full(path.parent))
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full and not isinstance(exc, OutputError):
            raise _no_space(path) from exc
        raise
    except RuntimeError as exc:
        # Some writers (torch.save, ...) turn a failed write into a RuntimeError without an errno.
        full = _disk_nearly_full(path.parent)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise _no_space(path) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike, error: type[Exception]):
    """A JSON file, or `error` naming the file and what is wrong with it."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not readable JSON ({exc})") from None


# --- one run at a time, and its outputs as one unit ---------------------------------------------------------------

LOCK_NAME = ".incompat.lock"
PREVIOUS_PREFIX = ".incompat-previous-"


class OutputLocked(OutputError):
    """Another run holds the output folder: this one stops before writing anything."""


def _holder(lock_path: Path) -> str:
    """Who holds the lock, as its holder wrote it; a holder that has just taken it gets a moment to write it."""

    for _ in range(20):
        try:
            text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            break
        time.sleep(0.05)
    try:
        info = json.loads(text)
    except ValueError:
        return "holder unknown"
    command = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(info.get("command", "?")))[:300]
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}, "
            f"command: {command}")


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """An exclusive lock on `folder` for one run, held until the block ends (the kernel drops it when the process
    dies, so a killed run never leaves the folder locked). Non-blocking: a second run raises OutputLocked at once,
    naming the holder (pid, host, start time, command), which the holder writes into the lock file."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{folder}: another run is writing this folder ({_holder(lock_path)}); wait for it "
                               "to finish or write elsewhere") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield lock_path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the next reader finds no stale holder
    finally:
        os.close(fd)


# Paths of this process's open units: a step that makes its files one unit does nothing more inside a run that
# already made all of them one.
_OPEN_UNITS: list[frozenset[Path]] = []


def _restore(backup: Path, root: Path) -> None:
    """Put back what a unit's backup holds: every covered file as it was when the unit began, and (when the unit
    began over earlier outputs) no covered file that did not exist then."""

    manifest = backup / "unit.json"
    if manifest.exists():
        unit = json.loads(manifest.read_text())
        existed = set(unit["existed"])
        for rel in unit["existed"]:
            saved = backup / "files" / rel
            if saved.exists():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(saved, root / rel)
        if existed:
            for rel in unit["covered"]:
                if rel not in existed:
                    with contextlib.suppress(FileNotFoundError):
                        (root / rel).unlink()
    shutil.rmtree(backup, ignore_errors=True)


def _keep_copy(path: Path, saved: Path) -> None:
    saved.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, saved)  # no data copied: the writers replace files (new inodes), they never write in place
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(saved) from exc
        shutil.copy2(path, saved)  # a file system without hard links


@contextlib.contextmanager
def replace_together(root: str | os.PathLike, paths: list[Path], name: str) -> Iterator[None]:
    """Make the writes to `paths` (files under `root`) one unit: if the block fails (a full disk, bad data, an
    interrupt), every one of them is put back as it was when the block began, so a folder that held a finished set
    of outputs still holds that set, never new scores beside old clean data. Files the block created are removed
    again only when the folder held earlier outputs; a first run keeps what it finished, for the next one to resume.

    How: hard links to the existing files are kept in `root/.incompat-previous-<name>/` while the block runs (the
    writers replace files, so the links keep the old content) and dropped at the end. A run killed inside the block
    leaves that folder behind; the next unit over the same files puts the old set back before it begins."""

    root = Path(root)
    resolved = frozenset(Path(p).resolve() for p in paths)
    if any(resolved <= unit for unit in _OPEN_UNITS):
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    for leftover in sorted({p.parent for p in map(Path, paths)} | {root}):
        if leftover.is_dir():
            for backup in leftover.glob(PREVIOUS_PREFIX + "*"):
                if backup.name.endswith(".partial"):
                    shutil.rmtree(backup, ignore_errors=True)  # killed before the unit began: nothing was written
                else:
                    logging.getLogger(__name__).warning("%s: a run stopped part-way; putting back the files it "
                                                        "replaced (%s)", leftover, backup.name)
                    _restore(backup, leftover)
    backup = root / f"{PREVIOUS_PREFIX}{name}"
    partial = root / f"{PREVIOUS_PREFIX}{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    covered = sorted(os.path.relpath(p, root) for p in map(Path, paths))
    existed = [rel for rel in covered if (root / rel).is_file()]
    partial.mkdir()
    for rel in existed:
        _keep_copy(root / rel, partial / "files" / rel)
    (partial / "unit.json").write_text(json.dumps({"covered": covered, "existed": existed}))
    os.replace(partial, backup)
    _OPEN_UNITS.append(resolved)
    try:
        yield
    except BaseException:
        _restore(backup, root)
        raise
    else:
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        _OPEN_UNITS.remove(resolved)
