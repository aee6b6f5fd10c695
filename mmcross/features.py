"""What the encoders give of N images or N captions, as plain tensors: one type per modality.

The same bundle flows from the towers to the losses, the re-ranker, the index's token cache and the training
feature cache; `Matcher.prepare` fills its fusion-dependent fields. `pooled` is the tower's raw projection when a
tower returns it and a unit vector from `Matcher.encode_image` / `Matcher.encode_text` on, the one place where it
is normalised (`unit`).

Shapes: N items, E embedding size, P patches, L caption tokens, Dv/Dt encoder token widths, D fusion width,
X cross layers, H heads, Dh head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def unit(pooled: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, in float32 (the dual encoder's embeddings; ITC is their dot product)."""
    return F.normalize(pooled.float(), dim=-1)


@dataclass
class _Features:
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """A copy with every tensor moved to `device` and floating tensors cast to `dtype`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            moved[f.name] = value
        return type(self)(**moved)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, as a flat dict (e.g. for `safetensors.torch.save_file`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]):
        """Inverse of `to_tensors`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(tensors) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} tensor(s): {', '.join(sorted(unknown))}")
        return cls(**tensors)

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def detached(self):
        """A copy whose tensors are cut from the autograd graph (no gradient flows back through them)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{name: None if t is None else t.detach() for name, t in values.items()})


@dataclass
class ImageFeatures(_Features):
    """N images. `pooled` and `tokens` depend on the encoder only; `states` and `kv` also on the fusion weights."""

    pooled: torch.Tensor  # (N, E) image embeddings (unit vectors once out of `Matcher.encode_image`)
    tokens: torch.Tensor  # (N, P, Dv) encoder patch tokens (class token excluded for ViTs)
    states: torch.Tensor | None = None  # (N, P, D) image states after the fusion's image self-attention
    kv: torch.Tensor | None = None  # (N, X, 2, H, P, Dh) per-cross-layer keys/values (text_to_image only)

    def select(self, index: torch.Tensor | Sequence[int]) -> ImageFeatures:
        """The rows `index` (K,) of every tensor."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.pooled.device)
        return ImageFeatures(
            *(None if t is None else t[index] for t in (self.pooled, self.tokens, self.states, self.kv))
        )

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """The rows of `parts` in order (every part with the same fields set)."""
        return ImageFeatures(
            *(None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts]) for n in _IMAGE)
        )


@dataclass
class TextFeatures(_Features):
    """N captions, token rows padded to the longest. `pooled`, `tokens`, `mask` depend on the encoder only;
    `states` also on the fusion weights. Padding changes no score."""

    pooled: torch.Tensor  # (N, E) caption embeddings (unit vectors once out of `Matcher.encode_text`)
    tokens: torch.Tensor  # (N, L, Dt) encoder token states; L = the longest caption (or the full context)
    mask: torch.Tensor  # (N, L) bool, True at real tokens (start, words, end), False at padding
    states: torch.Tensor | None = None  # (N, L, D) text states after the fusion's text self-attention

    def select(self, index: torch.Tensor | Sequence[int]) -> TextFeatures:
        """The rows `index` (K,), cut to the longest selected caption."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]  # (K, L)
        length = max(int(mask.sum(dim=1).max()), 1) if len(index) else 1
        states = None if self.states is None else self.states[index, :length]
        return TextFeatures(self.pooled[index], self.tokens[index, :length], mask[:, :length], states)

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        """The rows of `parts` in order, token rows zero-padded to the longest part."""
        length = max(p.mask.shape[1] for p in parts)
        return TextFeatures(
            torch.cat([p.pooled for p in parts]),
            _pad_cat([p.tokens for p in parts], length),
            _pad_cat([p.mask for p in parts], length),
            None if parts[0].states is None else _pad_cat([p.states for p in parts], length),
        )


_IMAGE = ("pooled", "tokens", "states", "kv")


def _pad_cat(chunks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate (n, l, ...) chunks along the first axis after zero-padding axis 1 to `length`."""
    padded = [F.pad(c, (0, 0) * (c.ndim - 2) + (0, length - c.shape[1])) for c in chunks]
    return torch.cat(padded)
