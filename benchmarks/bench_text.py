"""Text encoding: mmcross's TextEncoder (cut to the longest caption, length-bucketed) vs open_clip's encode_text."""

from __future__ import annotations

import torch

from benchmarks.common import best_seconds, flickr8k_captions
from mmcross.config import EncoderCfg
from mmcross.encoders import build_open_clip_reference, load_encoders

N_CAPTIONS = 500
BATCH_SIZE = 128


def run() -> dict[str, float]:
    captions = flickr8k_captions(N_CAPTIONS)
    cfg = EncoderCfg(model_name="ViT-B-32", seed=0)
    ours = load_encoders(cfg).text
    reference, tokenizer = build_open_clip_reference(cfg)
    tokens = tokenizer(captions)  # (N, 77)

    @torch.inference_mode()
    def open_clip_encode() -> torch.Tensor:
        return torch.cat([reference.encode_text(tokens[i : i + BATCH_SIZE]) for i in range(0, len(tokens), BATCH_SIZE)])

    def ours_encode() -> torch.Tensor:
        return ours.encode(captions, batch_size=BATCH_SIZE)

    max_abs_diff = float((ours_encode() - open_clip_encode()).abs().max())
    t_ref = best_seconds(open_clip_encode)
    t_ours = best_seconds(ours_encode)
    return {
        "text_encode.captions": len(captions),
        "text_encode.batch_size": BATCH_SIZE,
        "text_encode.open_clip_captions_per_s": len(captions) / t_ref,
        "text_encode.mmcross_captions_per_s": len(captions) / t_ours,
        "text_encode.speedup": t_ref / t_ours,
        "text_encode.max_abs_diff_vs_open_clip": max_abs_diff,
    }
