"""`mmcross score` as the pairs table grows: peak memory (it streams, so it should stay flat) and rows per second.

Each figure runs `mmcross score PAIRS --out OUT.csv --model tiny` in a fresh process on a generated CSV (8 small
PNGs referenced over and over, captions varied) and reads that process's peak RSS from `os.wait4` (its own
`ru_maxrss`, not the maximum over every child this process has had).

- `score.tiny.<n>.peak_mib`, `score.tiny.<n>.rows_per_s`: the real command, n = 1k and 10k rows (100k only with
  MMCROSS_BENCH_FULL=1: the tiny preset scores about 30 rows/s on 2 shared CPU cores, an hour for 100k).
- `score.io.<n>.peak_mib`, `score.io.<n>.rows_per_s`: the same command in the same kind of process (model loaded),
  with the model's forward passes answering zeros: every row is still read, its image decoded and preprocessed, its
  caption checked and tokenized, and the row written with its scores; n = 10k and 100k rows. This is the part whose
  memory could grow with the rows; the forward pass works on one batch at a time.
- `score.<kind>.growth_mib`: peak at the largest size minus peak at the smallest (about 0 when streaming).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = os.environ.get("MMCROSS_BENCH_FULL", "") not in ("", "0")
ROOT = Path(__file__).resolve().parents[1]
WORDS = "a the dog cat man woman child runs jumps sits on in near grass beach snow red blue ball street water".split()


def write_pairs(folder: Path, n: int, images: int = 8) -> Path:
    """A CSV of `n` rows (id, image, caption) over `images` generated PNGs in `folder`."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(images):
        path = folder / f"img{i}.png"
        if not path.exists():
            Image.fromarray(g.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    pairs = folder / f"pairs{n}.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption"])
        for k in range(n):
            w.writerow([k, f"img{k % images}.png", " ".join(g.choice(WORDS, 5 + k % 9))])
    return pairs


def run_child(args: list[str], log: Path) -> tuple[float, float]:
    """Run `args` as a child process; (seconds, peak RSS MiB) of that child alone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def score_args(pairs: Path, out: Path, io_only: bool) -> list[str]:
    entry = ["-m", "benchmarks.bench_score", "--io-child"] if io_only else ["-m", "cli"]
    return [sys.executable, *entry, "score", str(pairs), "--out", str(out), "--model", "tiny"]


def io_child(argv: list[str]) -> None:
    """`mmcross <argv>` with the model answering zeros (the streaming I/O without the forward passes): images are
    still decoded and preprocessed, captions tokenized, rows written."""
    import torch

    from cli import app
    from mmcross.features import ImageFeatures, TextFeatures
    from mmcross.model import Matcher, Scores

    def image_zeros(self, pixels):
        return ImageFeatures(torch.zeros(len(pixels), 1), torch.zeros(len(pixels), 1, 1))

    def text_zeros(self, text):
        n = len(self.tokenize(text))
        return TextFeatures(torch.zeros(n, 1), torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool))

    def score_zeros(self, image, text, *, return_attention=False) -> Scores:
        z = torch.zeros(max(len(image), len(text)))
        return Scores(z, z, z, z)

    Matcher.encode_image, Matcher.encode_text, Matcher.score_pairs = image_zeros, text_zeros, score_zeros
    app(argv, standalone_mode=True)


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    sizes = {"tiny": (1_000, 10_000, 100_000) if FULL else (1_000, 10_000), "io": (10_000, 100_000)}
    tmp = Path(tempfile.mkdtemp())
    try:
        for kind, ns in sizes.items():
            for n in ns:
                pairs = write_pairs(tmp, n)
                target = tmp / f"out-{kind}-{n}.csv"
                seconds, peak = run_child(score_args(pairs, target, kind == "io"), tmp / f"{kind}-{n}.log")
                with open(target) as f:
                    rows = sum(1 for _ in f) - 1
                if rows != n:
                    raise RuntimeError(f"score wrote {rows} rows for {n}")
                out[f"score.{kind}.{n}.peak_mib"] = peak
                out[f"score.{kind}.{n}.rows_per_s"] = n / seconds
            out[f"score.{kind}.growth_mib"] = (
                out[f"score.{kind}.{ns[-1]}.peak_mib"] - out[f"score.{kind}.{ns[0]}.peak_mib"]
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--io-child"]:
        io_child(sys.argv[2:])
    else:
        print(json.dumps(run(), indent=2))
