"""Dual-encoder embeddings for captions and image files, L2-normalised (the vectors the index stores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmcross.data.images import load_rgb
from mmcross.encoders import Encoders


def embed_texts(encoders: Encoders, captions: list[str], batch_size: int = 256) -> np.ndarray:
    """(N, E) float32 unit vectors, in input order."""
    empty = [i for i, caption in enumerate(captions) if not caption.strip()]
    if empty:
        raise ValueError(f"empty caption at position(s) {empty}")
    return F.normalize(encoders.text.encode(captions, batch_size=batch_size), dim=-1).numpy()


@torch.inference_mode()
def embed_images(encoders: Encoders, paths: list[str | Path], batch_size: int = 64) -> np.ndarray:
    """(N, E) float32 unit vectors for image files, in input order."""
    device = next(encoders.image.parameters()).device
    out = []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([encoders.image.preprocess(load_rgb(p)) for p in paths[start : start + batch_size]])
        out.append(F.normalize(encoders.image(pixels.to(device)).pooled.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, encoders.image.embed_dim), dtype=np.float32)
