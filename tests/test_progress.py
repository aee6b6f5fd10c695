"""The progress helper: nothing when disabled, plain lines (counts, rate, info) when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest

from mmcross.progress import Progress


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with Progress(10, "train", "steps", enabled=False, stream=stream) as bar:
        bar.advance(5, "loss 1.0")
    assert stream.getvalue() == ""


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = Progress(10, "train", "steps", done=2, interval_s=0, stream=stream)
    bar.update(4, "loss 0.5000 lr 1.00e-04")
    bar.close()
    bar.close()  # a second close writes nothing more
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train: 4/10 steps, ") and "steps/s" in lines[0] and "ETA" in lines[0]
    assert lines[0].endswith("loss 0.5000 lr 1.00e-04")
    assert lines[1].startswith("train: 4/10 steps, ") and "done in" in lines[1]


def test_plain_lines_are_rate_limited():
    stream = io.StringIO()
    with Progress(1000, "embedding", "images", interval_s=3600, stream=stream) as bar:
        for _ in range(100):
            bar.advance(10)
    assert stream.getvalue() == ""  # a job shorter than the interval leaves no line, not even a final one
    clock = [0.0]
    with Progress(1000, "embedding", "images", interval_s=30, stream=stream, clock=lambda: clock[0]) as bar:
        for _ in range(100):
            clock[0] += 1.0  # 1 s per 10 images: a line at 30 s, 60 s, 90 s, then the final one
            bar.advance(10)
    lines = stream.getvalue().splitlines()
    assert [line.split(" images")[0] for line in lines] == [
        f"embedding: {n}/1,000" for n in ("300", "600", "900", "1,000")
    ]
    assert "ETA 0:01:10" in lines[0] and "done in 100s" in lines[-1]


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMCROSS_PROGRESS_INTERVAL", "0.5")
    assert Progress(1, "x", stream=io.StringIO()).interval_s == 0.5
    monkeypatch.delenv("MMCROSS_PROGRESS_INTERVAL")
    assert Progress(1, "x", stream=io.StringIO()).interval_s == 30.0
    monkeypatch.setenv("MMCROSS_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="MMCROSS_PROGRESS_INTERVAL must be a number"):
        Progress(1, "x", stream=io.StringIO())
