"""Run the benchmarks and write their named figures as one JSON file.

Usage: python -m benchmarks.run [--out bench-results.json] [--only text ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import bench_fast, bench_index, bench_loader, bench_rerank, bench_score, bench_text, train_step

# "fast" runs last: OpenVINO's threading runtime, once loaded, can crash later multi-threaded torch work in-process
BENCHES = {
    "index": bench_index.run,
    "loader": bench_loader.run,
    "rerank": bench_rerank.run,
    "score": bench_score.run,
    "text": bench_text.run,
    "train_step": train_step.run,
    "fast": bench_fast.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    args = parser.parse_args()
    if args.only == []:
        parser.error("--only needs the names of the benchmarks to run")
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)  # before the hour of work, not after
    results: dict[str, object] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for name in [n for n in BENCHES if n in (args.only or BENCHES)]:
        start = time.perf_counter()
        results.update(BENCHES[name]())
        print(f"bench {name}: {time.perf_counter() - start:.1f}s")
    print(json.dumps(results, indent=2))  # first: the figures survive a failing write
    with open(args.out, "w") as out:
        json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
