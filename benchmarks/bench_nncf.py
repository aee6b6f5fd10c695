"""OpenVINO's own int8 (NNCF) on both towers, against the torch fp32 vectors: the issue-18 candidate
"OpenVINO with NNCF or its weight compression".

Variants (each an `openvino.Model` read from the cached fp32 ONNX graph of `mmcross.fast`, compiled for the CPU with
the same settings as `mmcross.fast.sessions`):

- `ov-fp32`: the fp32 graph as is (the reference of the runtime itself);
- `cw-int8-asym` / `cw-int8-sym`: `nncf.compress_weights` (weights int8 per output channel, no data; OpenVINO's CPU
  plugin quantises the activations of those layers at run time, groups of 32). `cw-int8-sym` is what
  `--precision int8 --runtime openvino` runs (`mmcross.fast.export.compress_int8_openvino`);
- `q-mixed`, `q-performance`: `nncf.quantize(model_type=TRANSFORMER)` (weights and activations int8, static scales),
  calibrated on the first `--calib` images of the set (batch of one each) and, for the text tower, the captions of
  those images; `q-mixed-nosq`: the same without SmoothQuant.

For each: image and caption cosine to the torch fp32 vector (mean / min), the top-10 overlap of the first 100
captions as queries (as `bench_fast`), the seconds NNCF took, and with `--speed` images/s and captions/s of the
encoders alone (batches of 64 pixels already decoded, 256 captions; torch fp32 too, as `torch-fp32`). Time on a quiet
machine: `python -m benchmarks.bench_nncf --images 500 --captions 2000 --speed`.

Usage: python -m benchmarks.bench_nncf [--preset vit-b-32] [--images 200] [--captions 1000] [--calib 64]
                                       [--variants ov-fp32,cw-int8-asym,...] [--speed]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import FLICKR8K, flickr8k_captions, scratch_cache

VARIANTS = ("ov-fp32", "cw-int8-asym", "cw-int8-sym", "q-mixed", "q-performance", "q-mixed-nosq")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _top10(queries: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ images.T), axis=1, kind="stable")[:, :10]


def _ov_model(variant: str, onnx_path: Path, calibration: list[np.ndarray]):
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    if variant == "ov-fp32":
        return model
    if variant.startswith("cw-"):
        mode = nncf.CompressWeightsMode.INT8_SYM if variant == "cw-int8-sym" else nncf.CompressWeightsMode.INT8_ASYM
        return nncf.compress_weights(model, mode=mode)
    preset = nncf.QuantizationPreset.PERFORMANCE if variant == "q-performance" else nncf.QuantizationPreset.MIXED
    advanced = None
    if variant.endswith("nosq"):
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    return nncf.quantize(
        model,
        nncf.Dataset(calibration),
        preset=preset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        advanced_parameters=advanced,
    )


def run_nncf(
    preset: str = "vit-b-32",
    n_images: int = 200,
    n_captions: int = 1000,
    n_calib: int = 64,
    variants: tuple[str, ...] = VARIANTS,
    speed: bool = False,
) -> dict:
    from mmcross.config import DataCfg, ModelRef
    from mmcross.data.images import load_rgb
    from mmcross.data.registry import open_dataset
    from mmcross.encode import encode_texts
    from mmcross.factory import graph_cache_dir, load_matcher, model_fingerprint
    from mmcross.fast.cache import graph
    from mmcross.fast.sessions import openvino_runner

    out: dict[str, object] = {}
    with scratch_cache():
        records = list(open_dataset(FLICKR8K, DataCfg(split="train")).records())[: max(n_images, n_calib)]
        captions = flickr8k_captions(n_captions)
        ref = ModelRef(model=preset)
        matcher = load_matcher(ref)
        image_enc, text_enc = matcher.image_encoder, matcher.text_encoder
        pixels = torch.stack([image_enc.preprocess(load_rgb(r.path)) for r in records])
        calib_images = [pixels[i : i + 1].numpy() for i in range(n_calib)]
        calib_captions = [c for r in records[:n_calib] for c in r.captions]
        calib_texts = []
        for c in calib_captions:
            ids = text_enc.tokenize([c])
            length = int(text_enc.padding_mask(ids).sum())
            calib_texts.append(ids[:, :length].numpy())
        pixels = pixels[:n_images]

        def vectors() -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                images = torch.cat([matcher.encode_image(pixels[i : i + 64]).pooled for i in range(0, n_images, 64)])
                texts = encode_texts(matcher, captions, batch_size=256, tokens=False).pooled
            return images.numpy(), texts.numpy()

        base_images, base_texts = vectors()
        base_top = _top10(base_texts[:100], base_images)
        fingerprint = model_fingerprint(matcher)
        folder = graph_cache_dir(ref, matcher, fingerprint)
        onnx = {tower: graph(matcher, tower, "fp32", folder, fingerprint) for tower in ("image", "text")}

        def timings(name: str) -> None:  # the encoders as they are now: images/s and captions/s
            with torch.inference_mode():
                matcher.encode_image(pixels[:64])  # warm-up
                start = time.perf_counter()
                for i in range(0, n_images, 64):
                    matcher.encode_image(pixels[i : i + 64])
                out[f"{name}.images_per_s"] = n_images / (time.perf_counter() - start)
                encode_texts(matcher, captions[:256], batch_size=256, tokens=False)
                start = time.perf_counter()
                encode_texts(matcher, captions, batch_size=256, tokens=False)
                out[f"{name}.captions_per_s"] = len(captions) / (time.perf_counter() - start)

        if speed:
            timings(f"nncf.{preset}.torch-fp32")
        for variant in variants:
            name = f"nncf.{preset}.{variant}"
            start = time.perf_counter()
            image_enc.runtime = openvino_runner(_ov_model(variant, onnx["image"], calib_images))
            text_enc.runtime = openvino_runner(_ov_model(variant, onnx["text"], calib_texts))
            out[f"{name}.convert_s"] = time.perf_counter() - start
            try:
                images, texts = vectors()
                if speed:
                    timings(name)
            finally:
                image_enc.runtime = text_enc.runtime = None
            ci, ct = _cos(images, base_images), _cos(texts, base_texts)
            out[f"{name}.image_cos_mean"], out[f"{name}.image_cos_min"] = float(ci.mean()), float(ci.min())
            if n_calib < n_images:  # the images the calibration did not see
                held = ci[n_calib:]
                out[f"{name}.image_cos_mean_uncalibrated"] = float(held.mean())
            out[f"{name}.text_cos_mean"], out[f"{name}.text_cos_min"] = float(ct.mean()), float(ct.min())
            top = _top10(texts[:100], images)
            out[f"{name}.top10_overlap"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, base_top)]))
            print(json.dumps({k: v for k, v in out.items() if k.startswith(name + ".")}), flush=True)
        out[f"nncf.{preset}.images"], out[f"nncf.{preset}.captions"] = n_images, len(captions)
        out[f"nncf.{preset}.calibration_images"] = n_calib
        out[f"nncf.{preset}.calibration_captions"] = len(calib_texts)
        return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--calib", type=int, default=64, help="calibration images (first N), for nncf.quantize")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--speed", action="store_true", help="also time the encoders (on a quiet machine)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    result = run_nncf(
        args.preset, args.images, args.captions, args.calib, tuple(args.variants.split(",")), speed=args.speed
    )
    print(json.dumps(result, indent=2))
