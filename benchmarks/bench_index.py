"""Index and search: build throughput against the bare model forward, search latency, faiss IVF recall@10.

- `index.<preset>.images_per_s`: `build_index` on the first n Flickr8k images (decode in 2 workers, encode,
  write shards with token cache; the weights fingerprint, worker start-up and manifest included), against
  `index.<preset>.forward_images_per_s`, the image encoder alone on the same images already decoded and batched
  (batches of 64 on both sides, one warm-up batch before either); `ratio` is the first over the second (goal
  >= 0.85). tiny (n = 1024) and vit-b-32 (the CLI's default, random init, n = 256). On 2 cores the DataLoader
  workers' JPEG decoding takes CPU from the model, so the ratio is lower for the tiny model (decoding costs about
  as much as its forward) than for vit-b-32.
- `search.<backend>.<n>.ms_per_query`: 100 random queries, top 10, dim 512, in one batch, for torch-exact and
  faiss (flat, IVF with the default nlist/nprobe); 1M vectors only with MMCROSS_BENCH_FULL=1.
- `search.ivf.100k.recall@10`: against exact, on clustered random vectors (1000 centres) and on structureless
  uniform random vectors (where IVF needs most of its lists).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import FLICKR8K
from mmcross.index.search import build_faiss, exact_search, faiss_search

FULL = os.environ.get("MMCROSS_BENCH_FULL", "") not in ("", "0")
DIM = 512


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _recall(ids, ref) -> float:
    return float(np.mean([len(set(a) & set(b)) / ref.shape[1] for a, b in zip(ids, ref)]))


def _clustered(n: int, g, queries: int = 200):
    centres = _unit(g.standard_normal((1000, DIM)))
    x = _unit(centres[g.integers(0, 1000, n)] + 0.04 * g.standard_normal((n, DIM)))
    q = _unit(centres[g.integers(0, 1000, queries)] + 0.04 * g.standard_normal((queries, DIM)))
    return x, q


def bench_search() -> dict[str, float]:
    out: dict[str, float] = {}
    g = np.random.default_rng(0)
    sizes = (10_000, 100_000, 1_000_000) if FULL else (10_000, 100_000)
    for n in sizes:
        x, q = _clustered(n, g, queries=100)
        start = time.perf_counter()
        _, ref = exact_search(x, q, 10)
        out[f"search.exact.{n}.ms_per_query"] = (time.perf_counter() - start) * 1000 / len(q)
        for kind in ("flat", "ivf", "hnsw"):
            start = time.perf_counter()
            index = build_faiss(x, kind)
            out[f"search.{kind}.{n}.build_s"] = time.perf_counter() - start
            start = time.perf_counter()
            _, ids = faiss_search(index, q, 10)
            out[f"search.{kind}.{n}.ms_per_query"] = (time.perf_counter() - start) * 1000 / len(q)
            out[f"search.{kind}.{n}.recall@10"] = _recall(ids, ref)
    x, q = _unit(g.standard_normal((100_000, DIM))), _unit(g.standard_normal((100, DIM)))
    _, ref = exact_search(x, q, 10)
    index = build_faiss(x, "ivf", nlist=256)
    for nprobe in (16, 64, 240):
        out[f"search.ivf.100000.uniform.nlist256.nprobe{nprobe}.recall@10"] = _recall(
            faiss_search(index, q, 10, nprobe=nprobe)[1], ref
        )
    return out


def bench_build(preset: str = "tiny", n: int = 256) -> dict[str, float]:
    from mmcross.config import DataCfg
    from mmcross.data.images import load_rgb
    from mmcross.data.registry import open_dataset
    from mmcross.factory import create_matcher
    from mmcross.index.build import BuildOptions, build_index

    tmp = Path(tempfile.mkdtemp())
    try:
        src = tmp / "ds"
        (src / "images").mkdir(parents=True)
        records = list(open_dataset(FLICKR8K, DataCfg(split="train")).records())[:n]
        lines = []
        for r in records:
            os.symlink(r.path, src / "images" / r.path.name)
            lines += [f"{r.path.name}#{i}\t{c}" for i, c in enumerate(r.captions)]
        (src / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
        matcher = create_matcher(preset)
        pixels = torch.stack([matcher.image_encoder.preprocess(load_rgb(r.path)) for r in records])
        with torch.inference_mode():
            matcher.encode_image(pixels[:64])  # warm-up for both sides (first-call allocations)
        opts = BuildOptions(batch_size=64, workers=2, progress=False, captions=False)
        start = time.perf_counter()
        build_index(src, tmp / "idx", matcher, opts=opts)
        build_s = time.perf_counter() - start
        with torch.inference_mode():
            start = time.perf_counter()
            for i in range(0, n, 64):
                matcher.encode_image(pixels[i : i + 64])
            fwd_s = time.perf_counter() - start
        return {
            f"index.{preset}.images_per_s": n / build_s,
            f"index.{preset}.forward_images_per_s": n / fwd_s,
            f"index.{preset}.ratio": fwd_s / build_s,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run() -> dict[str, float]:
    logging.getLogger().setLevel(logging.ERROR)
    return {**bench_build("tiny", 1024), **bench_build("vit-b-32", 256), **bench_search()}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
