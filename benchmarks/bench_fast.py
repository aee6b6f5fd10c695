"""The optimised inference path (`--precision`, `--runtime`) against open_clip's bare fp32 loop, same images, one run.

For each precision/runtime (torch fp32; onnx and openvino, fp32 and int8; those whose packages are missing are
left out and listed under `fast.<preset>.skipped`):

- `fast.<preset>.<precision>-<runtime>.index_images_per_s`: `build_index` (decode in 2 workers, encode, shards with
  token cache, fingerprint and manifest) on the first n Flickr8k train images, graphs already converted;
  `convert_s`: the conversion this configuration paid after the ones before it, in one cache (the steady-state
  figure leaves it out): int8 and openvino reuse the fp32 ONNX export, which an empty cache pays first;
- `.captions_per_s`: `encode_texts` of m Flickr8k captions (batches of 256, as `index` sends them);
- `.image_cos_mean/min`, `.text_cos_mean/min`: cosine of each vector with the torch fp32 one;
- `.top10_overlap`: the first 100 captions as queries against the images, both sides of this configuration, share of
  the torch fp32 top-10 positions found;
- `fast.<preset>.open_clip_encode_image_images_per_s`: open_clip's own model, `encode_image` under inference_mode
  in batches of 64 over the same images already decoded and preprocessed (the peer); each configuration's
  `speedup_vs_open_clip` is its index figure over this, and `captions_speedup` its captions/s over torch fp32's.

The fusion re-rank runs in torch whatever the precision (`bench_rerank` measures it).

Usage: python -m benchmarks.bench_fast [--preset vit-b-32] [--images 1000] [--captions 5000] [--fidelity-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import FLICKR8K, flickr8k_captions, scratch_cache

CONFIGS = (("fp32", "torch"), ("fp32", "onnx"), ("int8", "onnx"), ("fp32", "openvino"), ("int8", "openvino"))


def _dataset(root: Path, n: int) -> list:
    """A Flickr-layout folder of symlinks to the first `n` Flickr8k train images; returns their records."""
    from mmcross.config import DataCfg
    from mmcross.data.registry import open_dataset

    records = list(open_dataset(FLICKR8K, DataCfg(split="train")).records())[:n]
    (root / "images").mkdir(parents=True)
    lines = []
    for r in records:
        os.symlink(r.path, root / "images" / r.path.name)
        lines += [f"{r.path.name}#{i}\t{c}" for i, c in enumerate(r.captions)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return records


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _top10(queries: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ images.T), axis=1, kind="stable")[:, :10]


def _open_clip_images_per_s(preset: str, pixels: torch.Tensor) -> float:
    from mmcross.config import load_matcher_cfg
    from mmcross.encoders import build_open_clip_reference

    model, _ = build_open_clip_reference(load_matcher_cfg(preset).encoder)
    with torch.inference_mode():
        model.encode_image(pixels[:64])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(pixels), 64):
            model.encode_image(pixels[i : i + 64])
    return len(pixels) / (time.perf_counter() - start)


def run_fast(preset: str = "vit-b-32", n_images: int = 1000, n_captions: int = 5000, speed: bool = True) -> dict:
    from mmcross.config import InferenceCfg, ModelRef
    from mmcross.data.images import load_rgb
    from mmcross.encode import encode_texts
    from mmcross.factory import load_matcher
    from mmcross.fast import load_graphs, missing_packages, use_inference
    from mmcross.index.build import BuildOptions, build_index
    from mmcross.index.store import IndexStore

    out: dict[str, object] = {}
    with scratch_cache() as tmp:
        records = _dataset(tmp / "ds", n_images)
        captions = flickr8k_captions(n_captions)
        ref = ModelRef(model=preset)
        matcher = load_matcher(ref)
        if speed:
            pixels = torch.stack([matcher.image_encoder.preprocess(load_rgb(r.path)) for r in records])
            out[f"fast.{preset}.open_clip_encode_image_images_per_s"] = _open_clip_images_per_s(preset, pixels)
        vectors = {}
        skipped = []
        for precision, runtime in CONFIGS:
            if runtime != "torch" and missing_packages(runtime, precision):
                skipped.append(f"{precision}-{runtime} (missing {', '.join(missing_packages(runtime, precision))})")
                continue
            name = f"fast.{preset}.{precision}-{runtime}"
            start = time.perf_counter()
            use_inference(matcher, InferenceCfg(precision, runtime), ref)
            load_graphs(matcher)  # conversion timed here, not inside the first encoding
            out[f"{name}.convert_s"] = time.perf_counter() - start  # 0-ish when an earlier runtime built the graph
            opts = BuildOptions(batch_size=64, workers=2, progress=False, captions=False)
            index_dir = tmp / f"idx-{precision}-{runtime}"
            start = time.perf_counter()
            build_index(tmp / "ds", index_dir, matcher, opts=opts)
            if speed:
                out[f"{name}.index_images_per_s"] = n_images / (time.perf_counter() - start)
            images = np.asarray(IndexStore(index_dir).img_emb, dtype=np.float32)
            encode_texts(matcher, captions[:256], batch_size=256, tokens=False)  # warm-up
            start = time.perf_counter()
            texts = encode_texts(matcher, captions, batch_size=256, tokens=False).pooled.numpy()
            if speed:
                out[f"{name}.captions_per_s"] = len(captions) / (time.perf_counter() - start)
            vectors[(precision, runtime)] = images, texts
        base_images, base_texts = vectors[("fp32", "torch")]
        base_top = _top10(base_texts[:100], base_images)
        for (precision, runtime), (images, texts) in vectors.items():
            name = f"fast.{preset}.{precision}-{runtime}"
            ci, ct = _cos(images, base_images), _cos(texts, base_texts)
            out[f"{name}.image_cos_mean"], out[f"{name}.image_cos_min"] = float(ci.mean()), float(ci.min())
            out[f"{name}.text_cos_mean"], out[f"{name}.text_cos_min"] = float(ct.mean()), float(ct.min())
            top = _top10(texts[:100], images)
            out[f"{name}.top10_overlap"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, base_top)]))
            if speed:
                out[f"{name}.speedup_vs_open_clip"] = (
                    out[f"{name}.index_images_per_s"] / out[f"fast.{preset}.open_clip_encode_image_images_per_s"]
                )
                out[f"{name}.captions_speedup"] = (
                    out[f"{name}.captions_per_s"] / out[f"fast.{preset}.fp32-torch.captions_per_s"]
                )
        out[f"fast.{preset}.skipped"] = skipped
        out[f"fast.{preset}.images"], out[f"fast.{preset}.captions"] = n_images, len(captions)
        return out


def run() -> dict:
    logging.getLogger().setLevel(logging.ERROR)
    return run_fast("vit-b-32", 1000, 5000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--fidelity-only", action="store_true", help="cosines and top-10 overlap, no timings")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    print(json.dumps(run_fast(args.preset, args.images, args.captions, speed=not args.fidelity_only), indent=2))
