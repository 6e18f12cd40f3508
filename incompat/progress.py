"""Progress that a person can read without a terminal (DVC, nohup, a Prefect worker, a log file).

On a terminal a tqdm bar redraws in place; anywhere else it would either print nothing (disabled) or a wall of
carriage returns, and a long clustering would be silent for many minutes. `LineProgress` has the bar's interface
(`update`, `set_postfix`, `close`, `disable`) and writes one plain line when a phase starts, at most one line every
`INCOMPAT_PROGRESS_SECONDS` (default 30) while it runs, and one when it ends.
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_INTERVAL_SECONDS = 30.0


def interval_seconds() -> float:
    text = os.environ.get("INCOMPAT_PROGRESS_SECONDS", "").strip()
    if not text:
        return DEFAULT_INTERVAL_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"INCOMPAT_PROGRESS_SECONDS must be a number of seconds, got {text!r}") from None
    if value < 0 or value != value:
        raise ValueError(f"INCOMPAT_PROGRESS_SECONDS must be 0 or more, got {text!r}")
    return value


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class LineProgress:
    """A bar's stand-in that writes lines to stderr, rate-limited."""

    disable = False

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "", stream=None,
                 interval: float | None = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval_seconds() if interval is None else interval
        self.start = self.last = time.monotonic()
        self.postfix: dict = {}
        self.closed = False
        self._write(f"started ({self._count()})")

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.n}/{self.total}{unit}, {100 * self.n / self.total:.0f}%"
        return f"{self.n}{unit}"

    def _write(self, what: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {self.desc}: {what}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the work
            self.stream = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and not (self.total and self.n >= self.total):
            self.last = now
            elapsed = now - self.start
            line = f"{self._count()}, {_duration(elapsed)} elapsed"
            if self.total and self.n > 0:
                line += f", about {_duration(elapsed * (self.total - self.n) / self.n)} left"
            if self.postfix:
                line += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
            self._write(line)

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(f"finished ({self._count()}) in {_duration(time.monotonic() - self.start)}")


def progress(enabled: bool | str, total: int, desc: str, initial: int = 0, unit: str = "", **bar_options):
    """A tqdm bar on a terminal, lines elsewhere, nothing when not enabled. A string names the phase."""
    if isinstance(enabled, str) and enabled:
        desc = enabled
    stream = sys.stderr
    try:
        terminal = stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed
        stream, terminal = None, False
    if enabled and stream is not None and not terminal:
        return LineProgress(total, desc, initial=initial, unit=unit, stream=stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not (enabled and stream is not None),
                leave=False, **({"unit": unit} if unit else {}), **bar_options)
