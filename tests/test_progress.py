"""The progress helper: nothing when disabled, plain lines (counts, rate, info) when stderr is not a terminal."""

from __future__ import annotations

import io

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
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedding: 1,000/1,000 images")  # only the final line
