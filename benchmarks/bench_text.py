"""Text encoding: mmcross's encoding stage (batches cut to the longest caption, length-bucketed) vs open_clip's
encode_text, both giving unit vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import best_seconds, flickr8k_captions
from mmcross.encode import encode_texts
from mmcross.encoders import build_open_clip_reference
from mmcross.factory import create_matcher

N_CAPTIONS = 500
BATCH_SIZE = 128


def run() -> dict[str, float]:
    captions = flickr8k_captions(N_CAPTIONS)
    matcher = create_matcher("vit-b-32")
    reference, tokenizer = build_open_clip_reference(matcher.cfg.encoder)
    tokens = tokenizer(captions)  # (N, 77)

    @torch.inference_mode()
    def open_clip_encode() -> torch.Tensor:
        parts = [reference.encode_text(tokens[i : i + BATCH_SIZE]) for i in range(0, len(tokens), BATCH_SIZE)]
        return F.normalize(torch.cat(parts), dim=-1)

    def ours_encode() -> torch.Tensor:
        return encode_texts(matcher, captions, batch_size=BATCH_SIZE, tokens=False).pooled

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
