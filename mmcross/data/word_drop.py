"""Caption word dropout: a text augmentation for training from scratch on a few thousand captions.

Each whitespace-separated word of a caption is deleted with probability p; at least one word always stays. The draws
come from a torch generator, so a micro-batch's captions are a fixed function of its seed (resume takes the same
batches).
"""

from __future__ import annotations

import torch


def drop_words(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """`captions` with each word deleted with probability `p` (one word of a caption is always kept)."""
    if p <= 0:
        return list(captions)
    if p >= 1:
        raise ValueError(f"caption word drop must be below 1, got {p}")
    out = []
    for caption in captions:
        words = caption.split()
        if len(words) <= 1:
            out.append(caption)
            continue
        keep = torch.rand(len(words), generator=generator) >= p  # (W,)
        if not keep.any():
            keep[int(torch.randint(len(words), (1,), generator=generator))] = True
        out.append(" ".join(w for w, k in zip(words, keep.tolist()) if k))
    return out
