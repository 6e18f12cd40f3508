"""Crash-safe output files: write to a temporary sibling, fsync, rename into place.

A process killed mid-write (SIGKILL, power loss) leaves the previous version of the output untouched and at most a
hidden `.<name>.tmp-<host>-<pid>-<random>` sibling; the next write to the same output removes such leftovers of
processes that no longer run. A full disk is reported as OutputError(ENOSPC) naming the output, with nothing
written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import secrets
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
