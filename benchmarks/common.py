"""Shared helpers for the benchmarks: timing, the Flickr8k captions and a scratch cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from mmcross.data.flickr import read_token_file

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def flickr8k_captions(n: int) -> list[str]:
    """The first `n` captions of ../shared/data/flickr8k in file order."""
    captions = [c for caps in read_token_file(FLICKR8K / "Flickr8k.token.txt").values() for c in caps]
    return captions[:n]


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of `repeats` calls after one warm-up call (the minimum is the least noisy estimate)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@contextmanager
def scratch_cache() -> Iterator[Path]:
    """A temporary folder, removed afterwards, with MMCROSS_CACHE pointing into it while the block runs (an empty
    graph cache: the first use of each ONNX/OpenVINO graph converts it, as a new user's would)."""
    tmp = Path(tempfile.mkdtemp())
    try:
        with mock.patch.dict(os.environ, {"MMCROSS_CACHE": str(tmp / "cache")}):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
