"""One progress display for every long command: a rich bar on a terminal, a plain line every ~30 s elsewhere.

`mmcross train ... > train.log 2>&1` (nohup, cron, SLURM) then shows where it is without terminal control codes.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Progress of `total` items (or steps) on stderr; use as a context manager, or call `close()`.

    Args:
        total: items to do (0 = unknown: no ETA).
        label: what is being done, e.g. "train", "embedding images".
        unit: what is counted, e.g. "steps", "images".
        enabled: False shows nothing.
        done: items already done (a resumed job).
        interval_s: seconds between plain lines when the stream is not a terminal.
        stream: where to write (default: stderr); a terminal gets a rich bar, anything else plain lines.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "items",
        *,
        enabled: bool = True,
        done: int = 0,
        interval_s: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.total, self.label, self.unit, self.interval_s = total, label, unit, interval_s
        self.done = self.start_done = done
        self.info = ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = self.last_line = time.monotonic()
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
        return (self.done - self.start_done) / max(time.monotonic() - self.started, 1e-9)

    def update(self, done: int, info: str | None = None) -> None:
        """Set the count of items done, and optionally the info text (e.g. "loss 0.1234 lr 1.0e-04")."""
        self.done = done
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=self.info, rate=f"{self.rate():7.1f} {self.unit}/s")
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Count `n` more items done."""
        self.update(self.done + n, info)

    def _line(self, final: bool = False) -> None:
        rate = self.rate()
        parts = [f"{self.label}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {time.monotonic() - self.started:.0f}s")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if self.info:
            parts.append(self.info)
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last_line = time.monotonic()

    def close(self) -> None:
        """Stop the bar (or write the final plain line)."""
        if not self.enabled:
            return
        self.enabled = False
        if self.bar is not None:
            self.bar.stop()
        else:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
