"""Matcher: score formula, re-ranking from caches equals per-pair scoring, gradients, frozen encoders, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcross.config import FusionCfg, MatcherCfg
from mmcross.encode import encode_pixels, encode_texts
from mmcross.factory import create_matcher, list_models
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.fusion import MatchHead, build_fusion
from mmcross.model import Matcher

VARIANTS = ["joint", "text_to_image"]
CAPTIONS = ["a dog", "a red car on a long empty road", "cat", "two people walk on the beach at dusk", "x y", "a b c"]


class FakeImageEncoder(nn.Module):
    """(B, 3, 4, 4) pixels -> 4 patch tokens of width 12 and a pooled vector of size 8."""

    token_dim, embed_dim = 12, 8

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(12, 12)
        self.proj = nn.Linear(12, 8)

    def forward(self, pixels: torch.Tensor) -> ImageFeatures:
        patches = F.unfold(pixels, kernel_size=2, stride=2).transpose(1, 2)  # (B, 4, 12)
        tokens = torch.tanh(self.patch(patches))  # (B, 4, 12)
        return ImageFeatures(pooled=self.proj(tokens.mean(1)), tokens=tokens)


class FakeTextEncoder(nn.Module):
    """Word ids (0 = padding) -> token states of width 10, cut to the longest caption, and a pooled vector."""

    token_dim, embed_dim, context = 10, 8, 9

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 10)
        self.pos = nn.Parameter(torch.randn(self.context, 10))
        self.mix = nn.Linear(10, 10)
        self.proj = nn.Linear(10, 8)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.context, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = [1 + sum(map(ord, w)) % 49 for w in caption.split()][: self.context]
            ids[i, : len(words)] = torch.tensor(words)
        return ids

    def forward(self, ids: torch.Tensor) -> TextFeatures:
        mask = ids != 0  # (B, C)
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length], mask[:, :length]  # (B, L)
        tokens = torch.tanh(self.mix(self.embed(ids) + self.pos[:length]))  # (B, L, 10)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextFeatures(pooled=self.proj(pooled), tokens=tokens, mask=mask)


def fake_matcher(variant: str = "joint", itc_weight: float = 0.7, seed: int = 0) -> Matcher:
    torch.manual_seed(seed)
    fusion_cfg = FusionCfg(variant=variant, dim=16, self_layers=1, cross_layers=2, heads=2, dim_head=8, mlp_ratio=2)
    cfg = MatcherCfg(fusion=fusion_cfg, itc_weight=itc_weight)
    fusion = build_fusion(fusion_cfg, FakeImageEncoder.token_dim, FakeTextEncoder.token_dim)
    return Matcher(FakeImageEncoder(), FakeTextEncoder(), fusion, MatchHead(16), cfg).eval()


def pixels(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_score_is_itm_plus_weighted_itc_and_itc_is_the_dual_encoder_cosine():
    matcher = fake_matcher(itc_weight=0.7)
    images = pixels(len(CAPTIONS))
    with torch.no_grad():
        s = matcher.match(images, CAPTIONS)
        towers = matcher.image_encoder(images).pooled, matcher.text_encoder(matcher.tokenize(CAPTIONS)).pooled
        cosine = (F.normalize(towers[0], dim=-1) * F.normalize(towers[1], dim=-1)).sum(-1)
    assert torch.allclose(s.itc, cosine, atol=1e-6)
    assert torch.allclose(s.itm, torch.sigmoid(s.itm_logit))
    assert torch.allclose(s.score, s.itm + 0.7 * s.itc)
    assert torch.allclose(matcher.encode_image(images).pooled.norm(dim=-1), torch.ones(len(CAPTIONS)))
    assert torch.allclose(matcher.encode_text(CAPTIONS).pooled.norm(dim=-1), torch.ones(len(CAPTIONS)))


def per_pair(matcher: Matcher, images: torch.Tensor, captions: list[str]):
    """Score each (image, caption) pair alone, one forward pass per pair."""
    with torch.no_grad():
        rows = [matcher.match(image[None], [caption]) for image, caption in zip(images, captions, strict=True)]
    return torch.cat([r.score for r in rows]), torch.cat([r.itm for r in rows]), torch.cat([r.itc for r in rows])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prepare", [True, False])
def test_rerank_images_from_cache_equals_per_pair_scoring(variant, prepare):
    matcher = fake_matcher(variant)
    images = pixels(7)
    cache = encode_pixels(matcher, images, batch_size=3, prepare=prepare)
    assert (cache.states is not None) == prepare and (cache.kv is not None) == (prepare and variant == "text_to_image")
    query = CAPTIONS[1]
    got = matcher.rerank(query, cache, batch_size=3)  # three fusion calls: 3 + 3 + 1 candidates
    score, itm, itc = per_pair(matcher, images, [query] * 7)
    assert torch.allclose(got.score, score, atol=1e-5) and torch.allclose(got.itm, itm, atol=1e-5)
    assert torch.allclose(got.itc, itc, atol=1e-6)
    assert score.std() > 1e-3
    # the image encoder is not called again
    matcher.image_encoder.forward = None
    assert torch.allclose(matcher.rerank(query, cache, batch_size=100).score, got.score, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rerank_captions_from_cache_equals_per_pair_scoring(variant):
    matcher = fake_matcher(variant)
    # batches of different lengths, padded to the longest
    cache = encode_texts(matcher, CAPTIONS, batch_size=2, prepare=True)
    assert cache.tokens.shape[:2] == cache.mask.shape == (len(CAPTIONS), 8)
    image = pixels(1, seed=5)
    got = matcher.rerank(image[0], cache, batch_size=4)
    score, itm, _ = per_pair(matcher, image.expand(len(CAPTIONS), -1, -1, -1), CAPTIONS)
    assert torch.allclose(got.score, score, atol=1e-5) and torch.allclose(got.itm, itm, atol=1e-5)
    matcher.text_encoder.forward = None  # the captions are not encoded again
    subset = matcher.rerank(image, cache.select([4, 0, 2]))  # cut to its longest caption (3 words)
    assert torch.allclose(subset.score, score[[4, 0, 2]], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rerank_attention_maps_equal_aligned_pair_maps(variant):
    matcher = fake_matcher(variant)
    images = pixels(3)
    got = matcher.rerank("a red car", encode_pixels(matcher, images, prepare=True), return_attention=True)
    with torch.no_grad():
        want = matcher.match(images, ["a red car"] * 3, return_attention=True)
    assert len(got.attention) == 2 and got.attention[0].shape == (3, 2, 3, 4)  # (K, H, L, P)
    for a, b in zip(got.attention, want.attention, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert got.text_mask.shape == (3, 3) and got.text_mask.all()


def test_caches_are_plain_tensors_that_round_trip_and_may_be_float16():
    matcher = fake_matcher("text_to_image")
    images = pixels(4)
    cache = encode_pixels(matcher, images, prepare=True)
    again = ImageFeatures.from_tensors({k: v.clone() for k, v in cache.to_tensors().items()})
    assert torch.equal(matcher.rerank("a dog", again).score, matcher.rerank("a dog", cache).score)
    half = encode_pixels(matcher, images, dtype=torch.float16, prepare=False)
    assert half.tokens.dtype == torch.float16 and set(half.to_tensors()) == {"pooled", "tokens"}
    assert torch.allclose(matcher.rerank("a dog", half).score, matcher.rerank("a dog", cache).score, atol=1e-2)
    texts = encode_texts(matcher, CAPTIONS, prepare=True)
    assert set(texts.to_tensors()) == {"pooled", "tokens", "mask", "states"} and texts.mask.dtype == torch.bool
    assert len(TextFeatures.from_tensors(texts.to_tensors())) == len(CAPTIONS)
    with pytest.raises(ValueError, match="one query"):
        matcher.rerank(CAPTIONS[:2], cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_parameter_and_none_reaches_frozen_encoders(variant):
    matcher = fake_matcher(variant).train()
    images, captions = pixels(4), CAPTIONS[:4]
    s = matcher.match(images, captions)
    (s.itm_logit.sum() + s.itc.sum()).backward()
    for name, p in matcher.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    matcher = fake_matcher(variant).freeze_encoders().train()
    assert not matcher.image_encoder.training and not matcher.text_encoder.training and matcher.fusion.training
    s = matcher.match(images, captions)
    s.itm_logit.sum().backward()
    encoder_params = {id(p) for e in (matcher.image_encoder, matcher.text_encoder) for p in e.parameters()}
    trainable = {id(p) for p in matcher.trainable_parameters()}
    assert trainable and not trainable & encoder_params
    for name, p in matcher.named_parameters():
        if id(p) in encoder_params:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    matcher.freeze_encoders(False)
    assert len(matcher.trainable_parameters()) == len(list(matcher.parameters()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_preset_rerank_equals_per_pair_and_same_seed_gives_same_scores(variant):
    overrides = {"fusion.variant": variant}
    matcher = create_matcher("tiny", overrides=overrides)
    size = matcher.image_encoder.image_size
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    captions = ["a dog runs on the grass", "red", "a man in a blue shirt rides a bike down a hill"]
    got = matcher.rerank(captions[2], encode_pixels(matcher, images, prepare=True))
    score, _, _ = per_pair(matcher, images, [captions[2]] * 3)
    assert torch.allclose(got.score, score, atol=1e-5)
    got = matcher.rerank(images[1], encode_texts(matcher, captions, prepare=True))
    score, _, _ = per_pair(matcher, images[1:2].expand(3, -1, -1, -1), captions)
    assert torch.allclose(got.score, score, atol=1e-5)
    with torch.no_grad():
        first = matcher.match(images, captions).score
        same = create_matcher("tiny", overrides=overrides).match(images, captions).score
        other = create_matcher("tiny", overrides={**overrides, "fusion.seed": "1"}).match(images, captions).score
    assert torch.equal(first, same) and not torch.allclose(first, other)


def test_list_models_counts_fusion_and_head_parameters():
    tiny = {info.name: info for info in list_models()}["tiny"]
    assert tiny.params == sum(p.numel() for p in create_matcher("tiny").parameters())


def test_tiny_preset_gradients_reach_every_parameter_unless_encoders_are_frozen():
    matcher = create_matcher("tiny", overrides={"fusion.variant": "text_to_image"}).train()
    images = torch.randn(2, 3, *matcher.image_encoder.image_size)
    s = matcher.match(images, ["a dog", "a cat sleeps on a red mat"])
    (s.itm_logit.sum() + s.itc.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in matcher.parameters())
    matcher.zero_grad(set_to_none=True)
    matcher.freeze_encoders()
    matcher.match(images, ["a dog", "a cat sleeps on a red mat"]).itm_logit.sum().backward()
    for name, p in matcher.named_parameters():
        assert (p.grad is None) == name.startswith(("image_encoder.", "text_encoder.")), name
