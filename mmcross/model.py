"""The matcher: a dual encoder (ITC) and an MMCA-style fusion re-ranker (ITM) over the same encoder outputs.

Scores of a pair (image i, caption t), all in `Scores`:

    itc   = cos(e_i, e_t)                     e = L2-normalised pooled encoder embedding, in [-1, 1]
    itm   = sigmoid(head(fusion(i, t)))       match probability, in (0, 1)
    score = itm + cfg.itc_weight * itc        what results are ranked by (LAVIS ranks by ITM + ITC)

`Matcher.score_pairs` scores pairs from encoder outputs (`mmcross.features`); `Matcher.rerank` scores one query
against K candidates of the other modality from those same plain tensors, so no candidate is re-encoded. Encoding
many images or captions is `mmcross.encode`'s job.

Shapes: B pairs, K candidates, E embedding size, P patches, L caption tokens, Dv/Dt encoder token widths,
D fusion width, X cross layers, H heads, Dh head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmcross.config import InferenceCfg, MatcherCfg
from mmcross.features import ImageFeatures, TextFeatures, unit
from mmcross.fusion import Fusion, MatchHead

Text = str | Sequence[str] | torch.Tensor  # captions, or token ids (B, C) from `text_encoder.tokenize`
Features = ImageFeatures | TextFeatures


@dataclass
class Scores:
    """Scores of B pairs (aligned pairs, or one query against B candidates)."""

    itc: torch.Tensor  # (B,) cosine of the L2-normalised pooled embeddings
    itm_logit: torch.Tensor  # (B,) the match head's logit (BCE-trained)
    itm: torch.Tensor  # (B,) sigmoid(itm_logit), match probability
    score: torch.Tensor  # (B,) itm + itc_weight * itc, the ranking score
    attention: list[torch.Tensor] | None = None  # per cross layer (B, H, L, P) text-token -> image-patch weights
    text_mask: torch.Tensor | None = None  # (B, L) bool, which rows of `attention` are real tokens


class UntrainedHead(ValueError):
    """A command that ranks or scores by ITM was given a matcher whose fusion and head no run has trained."""


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
        # optimiser steps in which the fusion and head learnt from the ITM loss (0: random init); None: unknown, a
        # checkpoint written before mmcross recorded it, taken as trained so that old runs keep working
        self.head_steps: int | None = 0
        self.inference = InferenceCfg("fp32", "torch")  # how the encoders run (`mmcross.fast.use_inference`)

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
    def head_trained(self) -> bool:
        """Whether the fusion and match head were trained (or may have been: `head_steps` None), so ITM means
        something; an untrained head scores pairs by the noise of its random init."""
        return self.head_steps is None or self.head_steps > 0

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
        """Encoder outputs of (B, 3, H, W) pixels, `pooled` as unit vectors; no autograd when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            feats = self.image_encoder(pixels.to(self.device))
        return ImageFeatures(unit(feats.pooled), feats.tokens)

    def encode_text(self, text: Text) -> TextFeatures:
        """Encoder outputs of captions or token ids, `pooled` as unit vectors; no autograd when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            feats = self.text_encoder(self.tokenize(text))
        return TextFeatures(unit(feats.pooled), feats.tokens, feats.mask)

    # ---- fusion path -------------------------------------------------------------------------------------------

    def prepare(self, features: Features) -> Features:
        """Fill the fusion-dependent fields where missing: image `states` (and `kv` for text_to_image), or caption
        `states`; on the model's device."""
        features = features.to(self.device)
        if isinstance(features, TextFeatures):
            if features.states is None:
                features.states = self.fusion.text_side(features.tokens.to(self.dtype), features.mask)  # (N, L, D)
            return features
        if features.states is None:
            features.states = self.fusion.image_side(features.tokens.to(self.dtype))  # (N, P, D)
        if features.kv is None and self.fusion.caches_image_kv:
            features.kv = self.fusion.image_kv(features.states.to(self.dtype))  # (N, X, 2, H, P, Dh)
        return features

    def score_pairs(self, image: ImageFeatures, text: TextFeatures, *, return_attention: bool = False) -> Scores:
        """Scores of aligned pairs, image row i with caption row i; a side of one row is broadcast over the other.

        Fusion-dependent fields missing from either side are computed (`prepare`); encoder outputs from
        `encode_image` / `encode_text`, or the same tensors from a cache, index or feature cache.
        """
        image, text = self.prepare(image), self.prepare(text)

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.dtype)

        itc = (cast(image.pooled) * cast(text.pooled)).sum(-1)  # (B,)
        out = self.fusion.cross(
            cast(image.states), cast(text.states), text.mask, image_kv=cast(image.kv), need_weights=return_attention
        )
        logit = self.head(out.pooled, itc)  # (B,)
        itm = torch.sigmoid(logit)
        mask = text.mask.expand(out.pooled.shape[0], -1) if return_attention else None
        return Scores(itc, logit, itm, itm + self.cfg.itc_weight * itc, out.attention, mask)

    def match(self, pixels: torch.Tensor, text: Text, *, return_attention: bool = False) -> Scores:
        """Scores of aligned pairs: image pixels (B, 3, H, W) with B captions (or token ids (B, C))."""
        return self.score_pairs(self.encode_image(pixels), self.encode_text(text), return_attention=return_attention)

    forward = match

    # ---- re-ranking --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def rerank(
        self,
        query: str | torch.Tensor | Features,
        candidates: Features,
        *,
        batch_size: int = 256,
        return_attention: bool = False,
    ) -> Scores:
        """Score one query against K candidates of the other modality, without re-encoding any candidate.

        Args:
            query: one caption (a string, or its `TextFeatures`) re-ranks images; one image (pixels (3, H, W) or
                (1, 3, H, W), or its `ImageFeatures`) re-ranks captions.
            candidates: the K candidates' features; fusion-dependent fields are computed on the fly where missing.
            batch_size: candidates per fusion call (bounds memory).
            return_attention: return the attention maps (all K candidates in one call; `batch_size` is ignored).

        Returns:
            Scores (K,) in candidate order.
        """
        q = self._query(query)
        if type(q) is type(candidates):
            raise ValueError(
                "re-ranking scores image-caption pairs: a caption query re-ranks images, an image "
                "query re-ranks captions"
            )
        if len(q) != 1:
            kind = "caption" if isinstance(q, TextFeatures) else "image"
            raise ValueError(f"re-ranking takes one query {kind}, got {len(q)}")
        q = self.prepare(q)

        def pairs(c: Features) -> Scores:
            image, text = (c, q) if isinstance(q, TextFeatures) else (q, c)
            return self.score_pairs(image, text, return_attention=return_attention)

        k = len(candidates)
        if return_attention:
            return pairs(candidates)
        if k == 0:
            empty = torch.zeros(0, device=self.device, dtype=self.dtype)
            return Scores(empty, empty, empty, empty)
        parts = [pairs(candidates.select(torch.arange(s, min(s + batch_size, k)))) for s in range(0, k, batch_size)]
        return Scores(**{n: torch.cat([getattr(p, n) for p in parts]) for n in ("itc", "itm_logit", "itm", "score")})

    def head_info(self) -> dict[str, bool | int | None]:
        """{"trained", "steps"}: what checkpoints, index manifests and eval reports record of the head's training."""
        return {"trained": self.head_trained, "steps": self.head_steps}

    def require_trained_head(self, what: str) -> None:
        """Refuse `what` (e.g. "--rerank") when the head is untrained: it would rank by noise (`UntrainedHead`)."""
        if not self.head_trained:
            raise UntrainedHead(
                f"{what} needs a trained match head, but the fusion and head of {self.cfg.name} are random init (no "
                "training run trained them), so their scores are noise; pass --checkpoint RUN_DIR of a `mmcross "
                "train` run, or --allow-untrained-head to use them anyway"
            )

    def _query(self, query: str | torch.Tensor | Features) -> Features:
        if isinstance(query, ImageFeatures | TextFeatures):
            return query
        if isinstance(query, torch.Tensor) and query.is_floating_point():
            return self.encode_image(query if query.ndim == 4 else query[None])
        return self.encode_text(query)
