"""Shared helpers for the benchmarks: timing and the Flickr8k captions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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
