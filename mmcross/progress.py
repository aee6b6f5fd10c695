"""One progress display for every long command: a rich bar on a terminal, a plain line every ~30 s elsewhere.

`mmcross train ... > train.log 2>&1` (nohup, cron, SLURM) then shows where it is without terminal control codes.
Every long command (train, index, score, eval, embed) shows one; `--quiet` turns it off. The seconds between plain
lines come from `$MMCROSS_PROGRESS_INTERVAL` when set (tests use a short one), else 30.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

INTERVAL_ENV = "MMCROSS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def default_interval() -> float:
    """Seconds between plain progress lines: `$MMCROSS_PROGRESS_INTERVAL`, else 30."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"${INTERVAL_ENV} must be a number of seconds, got {value!r}") from None


class Progress:
    """Progress of `total` items (or steps) on stderr; use as a context manager, or call `close()`.

    Args:
        total: items to do (0 = unknown: no ETA).
        label: what is being done, e.g. "train", "embedding images".
        unit: what is counted, e.g. "steps", "images".
        enabled: False shows nothing.
        done: items already done (a resumed job).
        interval_s: seconds between plain lines when the stream is not a terminal (None: `default_interval()`).
        stream: where to write (default: stderr); a terminal gets a rich bar, anything else plain lines.
        clock: seconds, monotonic (tests pass a fake one to check the interval without waiting).
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "items",
        *,
        enabled: bool = True,
        done: int = 0,
        interval_s: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.label, self.unit = total, label, unit
        self.interval_s = default_interval() if interval_s is None else interval_s
        self.done = self.start_done = done
        self.info = ""
        self.lines = 0  # plain lines written
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.clock = clock
        self.started = self.last_line = clock()
        self.bar = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream),
            )
            self.task = self.bar.add_task(label, total=total or None, completed=done, info="", rate="")
            self.bar.start()

    def rate(self) -> float:
        """Items per second since the start (of this process)."""
        return (self.done - self.start_done) / max(self.clock() - self.started, 1e-9)

    def update(self, done: int, info: str | None = None) -> None:
        """Set the count of items done, and optionally the info text (e.g. "loss 0.1234 lr 1.0e-04")."""
        self.done = done
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=self.info, rate=f"{self.rate():7.1f} {self.unit}/s")
        elif self.clock() - self.last_line >= self.interval_s:
            self._line()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Count `n` more items done."""
        self.update(self.done + n, info)

    def _line(self, final: bool = False) -> None:
        rate = self.rate()
        parts = [f"{self.label}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {self.clock() - self.started:.0f}s")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if self.info:
            parts.append(self.info)
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.lines += 1
        self.last_line = self.clock()

    def close(self) -> None:
        """Stop the bar (or write the final plain line: only after earlier lines, so a short job leaves no noise)."""
        if not self.enabled:
            return
        self.enabled = False
        if self.bar is not None:
            self.bar.stop()
        elif self.lines or self.clock() - self.started >= self.interval_s:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
