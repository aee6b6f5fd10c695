"""The matcher: a dual encoder (ITC) and an MMCA-style fusion re-ranker (ITM) over the same encoder outputs.

Scores of a pair (image i, caption t), all in `Scores`:

    itc   = cos(e_i, e_t)                     e = L2-normalised pooled encoder embedding, in [-1, 1]
    itm   = sigmoid(head(fusion(i, t)))       match probability, in (0, 1)
    score = itm + cfg.itc_weight * itc        what results are ranked by (LAVIS ranks by ITM + ITC)

Re-ranking scores one query against k candidates from caches (`ImageCache`, `TextCache`) of plain tensors, so no
candidate is re-encoded; see `Matcher.rerank_images` and `Matcher.rerank_captions`.

Shapes: B pairs, K candidates, E embedding size, P patches, L caption tokens, Dv/Dt encoder token widths,
D fusion width, X cross layers, H heads, Dh head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mmcross.config import MatcherCfg
from mmcross.encoders import ImageFeatures, TextFeatures
from mmcross.fusion import Fusion, MatchHead

Text = str | Sequence[str] | torch.Tensor  # captions, or token ids (B, C) from `text_encoder.tokenize`


@dataclass
class Scores:
    """Scores of B pairs (aligned pairs, or one query against B candidates)."""

    itc: torch.Tensor  # (B,) cosine of the L2-normalised pooled embeddings
    itm_logit: torch.Tensor  # (B,) the match head's logit (BCE-trained)
    itm: torch.Tensor  # (B,) sigmoid(itm_logit), match probability
    score: torch.Tensor  # (B,) itm + itc_weight * itc, the ranking score
    attention: list[torch.Tensor] | None = None  # per cross layer (B, H, L, P) text-token -> image-patch weights
    text_mask: torch.Tensor | None = None  # (B, L) bool, which rows of `attention` are real tokens


@dataclass
class _Cache:
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


@dataclass
class ImageCache(_Cache):
    """What re-ranking needs of N images, as plain tensors (storable on disk as they are, float16 or float32).

    `pooled` and `tokens` depend on the encoder only; `states` and `kv` also on the fusion weights (fill them with
    `Matcher.prepare_images`, or keep them on disk beside a fingerprint of the whole model).
    """

    pooled: torch.Tensor  # (N, E) L2-normalised image embeddings
    tokens: torch.Tensor  # (N, P, Dv) encoder patch tokens
    states: torch.Tensor | None = None  # (N, P, D) image states after the fusion's image self-attention
    kv: torch.Tensor | None = None  # (N, X, 2, H, P, Dh) per-cross-layer keys/values (text_to_image only)

    def select(self, index: torch.Tensor | Sequence[int]) -> ImageCache:
        """The rows `index` (K,) of every tensor."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageCache(*(None if t is None else t[index] for t in (self.pooled, self.tokens, self.states, self.kv)))


@dataclass
class TextCache(_Cache):
    """What re-ranking needs of N captions, as plain tensors; token rows are padded to the longest caption.

    `pooled`, `tokens` and `mask` depend on the encoder only; `states` also on the fusion weights.
    """

    pooled: torch.Tensor  # (N, E) L2-normalised caption embeddings
    tokens: torch.Tensor  # (N, L, Dt) encoder token states, zeros at padding
    mask: torch.Tensor  # (N, L) bool, True at real tokens
    states: torch.Tensor | None = None  # (N, L, D) text states after the fusion's text self-attention

    def select(self, index: torch.Tensor | Sequence[int]) -> TextCache:
        """The rows `index` (K,), cut to the longest selected caption (padding changes no score)."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.mask[index]  # (K, L)
        length = max(int(mask.sum(dim=1).max()), 1) if len(index) else 1
        states = None if self.states is None else self.states[index, :length]
        return TextCache(self.pooled[index], self.tokens[index, :length], mask[:, :length], states)


def _pad_cat(chunks: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate (n, l, ...) chunks along the first axis after zero-padding axis 1 to `length`."""
    padded = [F.pad(c, (0, 0) * (c.ndim - 2) + (0, length - c.shape[1])) for c in chunks]
    return torch.cat(padded)


class Matcher(nn.Module):
    """Image-text matcher: dual-encoder embeddings (ITC) and fused match scores (ITM).

    Components are injected so tests can pass tiny fakes; `mmcross.factory.create_matcher` builds real ones.

    Args:
        image_encoder: pixels (B, 3, H, W) -> `ImageFeatures(pooled (B, E), tokens (B, P, Dv))`.
        text_encoder: token ids (B, C) -> `TextFeatures(pooled (B, E), tokens (B, L, Dt), mask (B, L))`; has
            `tokenize(list[str]) -> (B, C)`.
        fusion: the cross-attention fusion (`mmcross.fusion.Fusion`).
        head: the match head (`mmcross.fusion.MatchHead`), pooled (B, 2D) -> logits (B,).
        cfg: the architecture config; `cfg.itc_weight` weighs ITC in `score`.
    """

    def __init__(
        self, image_encoder: nn.Module, text_encoder: nn.Module, fusion: Fusion, head: MatchHead, cfg: MatcherCfg
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.head = head
        self.cfg: MatcherCfg = cfg
        self.encoders_frozen = False

    # ---- training controls -------------------------------------------------------------------------------------

    def freeze_encoders(self, frozen: bool = True) -> Matcher:
        """Freeze (or unfreeze) both encoders: no gradients reach them and they stay in eval mode under `train()`.

        Gradients still reach the fusion block and the head. Returns self.
        """
        self.encoders_frozen = frozen
        for encoder in (self.image_encoder, self.text_encoder):
            encoder.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Matcher:
        super().train(mode)
        if self.encoders_frozen:
            self.image_encoder.eval()
            self.text_encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients (fusion and head, plus the encoders unless frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.fusion.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The fusion's dtype; encoder tokens and cached tensors are cast to it."""
        return next(self.fusion.parameters()).dtype

    # ---- encoders (dual path) ----------------------------------------------------------------------------------

    def tokenize(self, text: Text) -> torch.Tensor:
        """Captions (or token ids) -> token ids (B, C) on the model's device."""
        if isinstance(text, str):
            text = [text]
        ids = text if isinstance(text, torch.Tensor) else self.text_encoder.tokenize(list(text))
        return (ids if ids.ndim == 2 else ids[None]).to(self.device)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """Encoder outputs of (B, 3, H, W) pixels; without autograd when the encoders are frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            return self.image_encoder(pixels.to(self.device))

    def encode_text(self, text: Text) -> TextFeatures:
        """Encoder outputs of captions or token ids; without autograd when the encoders are frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            return self.text_encoder(self.tokenize(text))

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, E)."""
        return F.normalize(self.encode_image(pixels).pooled.float(), dim=-1)

    def embed_text(self, text: Text) -> torch.Tensor:
        """L2-normalised caption embeddings (B, E)."""
        return F.normalize(self.encode_text(text).pooled.float(), dim=-1)

    # ---- fusion path -------------------------------------------------------------------------------------------

    def _scores(self, itc: torch.Tensor, pooled: torch.Tensor, out_attention, text_mask) -> Scores:
        logit = self.head(pooled, itc)  # (B,)
        itm = torch.sigmoid(logit)
        return Scores(itc, logit, itm, itm + self.cfg.itc_weight * itc, out_attention, text_mask)

    def score_features(self, image: ImageFeatures, text: TextFeatures, *, return_attention: bool = False) -> Scores:
        """Scores of aligned pairs from encoder outputs: image i with caption i (B pairs).

        Training (hard negatives) can encode a batch once and pair rows by indexing the features.
        """
        itc = (F.normalize(image.pooled.float(), dim=-1) * F.normalize(text.pooled.float(), dim=-1)).sum(-1)  # (B,)
        mask = text.mask.to(self.device)
        out = self.fusion(image.tokens.to(self.dtype), text.tokens.to(self.dtype), mask, need_weights=return_attention)
        return self._scores(itc.to(self.dtype), out.pooled, out.attention, mask if return_attention else None)

    def match(self, pixels: torch.Tensor, text: Text, *, return_attention: bool = False) -> Scores:
        """Scores of aligned pairs: image pixels (B, 3, H, W) with B captions (or token ids (B, C))."""
        return self.score_features(self.encode_image(pixels), self.encode_text(text), return_attention=return_attention)

    forward = match

    # ---- caches and re-ranking ---------------------------------------------------------------------------------

    def prepare_images(self, cache: ImageCache) -> ImageCache:
        """Fill the missing fusion-dependent fields (`states`, and `kv` for text_to_image) from the encoder tokens."""
        cache = cache.to(self.device)
        states = cache.states
        if states is None:
            states = self.fusion.image_side(cache.tokens.to(self.dtype))  # (N, P, D)
        kv = cache.kv
        if kv is None and self.fusion.variant == "text_to_image":
            kv = self.fusion.image_kv(states.to(self.dtype))  # (N, X, 2, H, P, Dh)
        return ImageCache(cache.pooled, cache.tokens, states, kv)

    def prepare_texts(self, cache: TextCache) -> TextCache:
        """Fill the fusion-dependent `states` from the encoder tokens, where missing."""
        cache = cache.to(self.device)
        if cache.states is not None:
            return cache
        states = self.fusion.text_side(cache.tokens.to(self.dtype), cache.mask)  # (N, L, D)
        return TextCache(cache.pooled, cache.tokens, cache.mask, states)

    @torch.no_grad()
    def cache_images(
        self, pixels: torch.Tensor, *, batch_size: int = 64, dtype: torch.dtype = torch.float32, prepare: bool = True
    ) -> ImageCache:
        """Encode (N, 3, H, W) images once into a re-ranking cache.

        Args:
            pixels: preprocessed images.
            batch_size: images per encoder call.
            dtype: floating dtype of the cached tensors (float16 halves the disk size; scores then differ slightly).
            prepare: also cache the fusion-dependent `states`/`kv`; False keeps the encoder outputs only.
        """
        parts = []
        for start in range(0, len(pixels), batch_size):
            feats = self.encode_image(pixels[start : start + batch_size])
            part = ImageCache(F.normalize(feats.pooled.float(), dim=-1), feats.tokens)
            parts.append(self.prepare_images(part) if prepare else part)
        merged = {name: [getattr(p, name) for p in parts] for name in ("pooled", "tokens", "states", "kv")}
        cache = ImageCache(**{k: None if v[0] is None else torch.cat(v) for k, v in merged.items()})
        return cache.to(dtype=dtype)

    @torch.no_grad()
    def cache_texts(
        self, text: Text, *, batch_size: int = 256, dtype: torch.dtype = torch.float32, prepare: bool = True
    ) -> TextCache:
        """Encode N captions (or token ids) once into a re-ranking cache, token rows padded to the longest.

        Args:
            text: captions or token ids (N, C).
            batch_size: captions per encoder call.
            dtype: floating dtype of the cached tensors.
            prepare: also cache the fusion-dependent `states`.
        """
        ids = self.tokenize(text)
        parts = []
        for start in range(0, len(ids), batch_size):
            feats = self.encode_text(ids[start : start + batch_size])
            part = TextCache(F.normalize(feats.pooled.float(), dim=-1), feats.tokens, feats.mask)
            parts.append(self.prepare_texts(part) if prepare else part)
        length = max(p.mask.shape[1] for p in parts)
        cache = TextCache(
            torch.cat([p.pooled for p in parts]),
            _pad_cat([p.tokens for p in parts], length),
            _pad_cat([p.mask for p in parts], length),
            _pad_cat([p.states for p in parts], length) if prepare else None,
        )
        return cache.to(dtype=dtype)

    def _query_image(self, query: torch.Tensor | ImageCache) -> ImageCache:
        if isinstance(query, ImageCache):
            cache = query
        else:
            feats = self.encode_image(query if query.ndim == 4 else query[None])
            cache = ImageCache(F.normalize(feats.pooled.float(), dim=-1), feats.tokens)
        if len(cache) != 1:
            raise ValueError(f"re-ranking takes one query image, got {len(cache)}")
        return self.prepare_images(cache)

    def _query_text(self, query: Text | TextCache) -> TextCache:
        if isinstance(query, TextCache):
            cache = query
        else:
            feats = self.encode_text(query)
            cache = TextCache(F.normalize(feats.pooled.float(), dim=-1), feats.tokens, feats.mask)
        if len(cache) != 1:
            raise ValueError(f"re-ranking takes one query caption, got {len(cache)}")
        return self.prepare_texts(cache)

    def _pair_scores(self, image: ImageCache, text: TextCache, return_attention: bool) -> Scores:
        """Scores of K pairs from prepared caches, one side of batch 1 (broadcast) or both of batch K."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, self.dtype)

        itc = (cast(image.pooled) * cast(text.pooled)).sum(-1)  # (K,)
        text_mask = text.mask.to(self.device)  # (K or 1, L)
        out = self.fusion.cross(
            cast(image.states), cast(text.states), text_mask, image_kv=cast(image.kv), need_weights=return_attention
        )
        mask = text_mask.expand(out.pooled.shape[0], -1) if return_attention else None
        return self._scores(itc, out.pooled, out.attention, mask)

    def _chunked(self, k: int, batch_size: int, score_chunk) -> Scores:
        if k == 0:
            empty = torch.zeros(0, device=self.device, dtype=self.dtype)
            return Scores(empty, empty, empty, empty)
        parts = [score_chunk(torch.arange(s, min(s + batch_size, k))) for s in range(0, k, batch_size)]
        return Scores(**{n: torch.cat([getattr(p, n) for p in parts]) for n in ("itc", "itm_logit", "itm", "score")})

    @torch.inference_mode()
    def rerank_images(
        self,
        query: Text | TextCache,
        images: ImageCache,
        *,
        batch_size: int = 256,
        return_attention: bool = False,
    ) -> Scores:
        """Score one caption against K cached images (text -> image search), without re-encoding any image.

        Args:
            query: one caption, its token ids (C,) or (1, C), or a 1-row `TextCache`.
            images: the K candidates; fusion-dependent fields are computed on the fly where missing.
            batch_size: candidates per fusion call (bounds memory).
            return_attention: return the attention maps (all K candidates in one call; `batch_size` is ignored).

        Returns:
            Scores (K,) in candidate order.
        """
        q = self._query_text(query)
        if return_attention:
            return self._pair_scores(self._prepared(images), q, True)
        return self._chunked(
            len(images), batch_size, lambda idx: self._pair_scores(self._prepared(images, idx), q, False)
        )

    @torch.inference_mode()
    def rerank_captions(
        self,
        query: torch.Tensor | ImageCache,
        captions: TextCache,
        *,
        batch_size: int = 256,
        return_attention: bool = False,
    ) -> Scores:
        """Score one image against K cached captions (image -> text search), without re-encoding any caption.

        Args:
            query: one image's pixels (3, H, W) or (1, 3, H, W), or a 1-row `ImageCache`.
            captions: the K candidates; `states` is computed on the fly where missing.
            batch_size: candidates per fusion call (bounds memory).
            return_attention: return the attention maps (all K candidates in one call; `batch_size` is ignored).

        Returns:
            Scores (K,) in candidate order.
        """
        q = self._query_image(query)
        if return_attention:
            return self._pair_scores(q, self._prepared(captions), True)
        return self._chunked(
            len(captions), batch_size, lambda idx: self._pair_scores(q, self._prepared(captions, idx), False)
        )

    def _prepared(self, cache: ImageCache | TextCache, index: torch.Tensor | None = None):
        if index is not None:
            cache = cache.select(index)
        return self.prepare_images(cache) if isinstance(cache, ImageCache) else self.prepare_texts(cache)
