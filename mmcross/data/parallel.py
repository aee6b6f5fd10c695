"""An ordered, bounded parallel map over a stream, in worker processes (image decoding is CPU-bound).

Workers are started with `spawn`, so they never inherit a parent's torch threads or open files, and the number of
items in flight is bounded, so a stream of shard samples is never read into memory all at once.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _apply_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int = 0, chunksize: int = 32) -> Iterator[R]:
    """`map(fn, items)` in `workers` processes (0: in this process), results in input order.

    `fn` must be a module-level function (it is sent to the workers by name) and must not raise.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    iterator = iter(items)
    pending: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            while len(pending) < workers * 4:
                chunk = list(itertools.islice(iterator, chunksize))
                if not chunk:
                    break
                pending.append(pool.submit(_apply_chunk, fn, chunk))
            if not pending:
                return
            yield from pending.popleft().result()
