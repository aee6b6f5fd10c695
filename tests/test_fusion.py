"""Fusion block and match head against a naive per-pair reference written with loops and a hand-made softmax."""

from __future__ import annotations

import math

import pytest
import torch

from mmcross.config import FusionCfg
from mmcross.fusion import CrossAttention, Fusion, MatchHead, build_fusion

P, DV, DT = 5, 12, 10  # patches, image and text token widths of the fake encoder outputs
VARIANTS = ["joint", "text_to_image"]
VARIANTS_AND_POOLS = [(v, pool) for pool in ("mean", "attention") for v in VARIANTS]


def make_fusion(variant: str, seed: int = 0, text_pool: str = "mean") -> tuple[Fusion, MatchHead]:
    cfg = FusionCfg(
        variant=variant, dim=16, self_layers=1, cross_layers=2, heads=2, dim_head=8, mlp_ratio=2.0, text_pool=text_pool
    )
    torch.manual_seed(seed)
    return build_fusion(cfg, DV, DT).eval(), MatchHead(cfg.dim).eval()


def make_batch(lengths: list[int], pad_to: int | None = None, seed: int = 1):
    """Random encoder outputs for len(lengths) pairs; padded text positions hold garbage, not zeros."""
    g = torch.Generator().manual_seed(seed)
    b, length = len(lengths), pad_to or max(lengths)
    image = torch.randn(b, P, DV, generator=g)  # (B, P, Dv)
    text = torch.randn(b, length, DT, generator=g) * 2  # (B, L, Dt)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    return image, text, mask


# ---- the reference: one pair at a time, real tokens only, plain arithmetic --------------------------------------


def ref_linear(x, lin):
    out = x @ lin.weight.T
    return out + lin.bias if lin.bias is not None else out


def ref_layer_norm(x, ln):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_attention(attn: CrossAttention, x, context):
    """x (N, D) over context (M, Dc): per head, per query, an explicit softmax. Returns output and (H, N, M)."""
    inner, dh = attn.heads * attn.dim_head, attn.dim_head
    heads_out, heads_weights = [], []
    for h in range(attn.heads):
        wq = attn.to_q.weight[h * dh : (h + 1) * dh]
        wk = attn.to_kv.weight[h * dh : (h + 1) * dh]
        wv = attn.to_kv.weight[inner + h * dh : inner + (h + 1) * dh]
        q, k, v = x @ wq.T, context @ wk.T, context @ wv.T
        rows, weight_rows = [], []
        for i in range(x.shape[0]):
            logits = torch.stack([(q[i] * k[j]).sum() / math.sqrt(dh) for j in range(context.shape[0])])
            e = torch.exp(logits - logits.max())
            w = e / e.sum()
            rows.append(sum(w[j] * v[j] for j in range(context.shape[0])))
            weight_rows.append(w)
        heads_out.append(torch.stack(rows))
        heads_weights.append(torch.stack(weight_rows))
    return ref_linear(torch.cat(heads_out, dim=-1), attn.to_out), torch.stack(heads_weights)


def ref_block(block, x, context=None):
    h = ref_layer_norm(x, block.norm_self)
    out, weights = ref_attention(block.self_attn, h, h)
    x = x + out
    if context is not None:
        out, weights = ref_attention(
            block.cross_attn, ref_layer_norm(x, block.norm_cross), ref_layer_norm(context, block.norm_context)
        )
        x = x + out
    lin1, _, _, lin2 = block.ff
    return x + ref_linear(ref_gelu(ref_linear(ref_layer_norm(x, block.norm_ff), lin1)), lin2), weights


def ref_pair(fusion: Fusion, head: MatchHead, image, text):
    """Logit and text->image attention maps of one pair: image (P, Dv), text (n, Dt) real tokens only."""
    img = ref_layer_norm(ref_linear(image, fusion.image_proj[0]), fusion.image_proj[1])
    txt = ref_layer_norm(ref_linear(text, fusion.text_proj[0]), fusion.text_proj[1])
    for block in fusion.image_self:
        img = ref_block(block, img)[0]
    for block in fusion.text_self:
        txt = ref_block(block, txt)[0]
    maps = []
    if fusion.variant == "joint":
        x = torch.cat([img + fusion.modality[0], txt + fusion.modality[1]])
        for block in fusion.cross_layers:
            x, weights = ref_block(block, x)
            maps.append(weights[:, P:, :P])
        img, txt = x[:P], x[P:]
    else:
        for block in fusion.cross_layers:
            txt, weights = ref_block(block, txt, context=img)
            maps.append(weights)
    pooled_img, txt = ref_layer_norm(img, fusion.norm_image).mean(0), ref_layer_norm(txt, fusion.norm_text)
    if fusion.text_pool is None:
        pooled_txt = txt.mean(0)
    else:  # learned attention pooling: softmax of one score per real token
        scores = ref_linear(txt, fusion.text_pool)[:, 0]
        e = torch.exp(scores - scores.max())
        pooled_txt = sum(w * t for w, t in zip(e / e.sum(), txt))
    pooled = torch.cat([pooled_img, pooled_txt, pooled_img * pooled_txt])
    ln, lin1, _, _, lin2 = head.net
    logit = ref_linear(ref_gelu(ref_linear(ref_layer_norm(pooled, ln), lin1)), lin2)[0]
    return logit, maps


# ---- tests --------------------------------------------------------------------------------------------------------


def test_cross_attention_equals_manual_softmax_and_explicit_path_equals_sdpa():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=8).eval()
    x, context = torch.randn(3, 4, 16), torch.randn(3, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        fast = attn(x, context, mask)  # scaled_dot_product_attention
        explicit, weights = attn.attend(x, attn.project_kv(context), mask, need_weights=True)
        for b in range(3):
            want, want_weights = ref_attention(attn, x[b], context[b][mask[b]])
            assert torch.allclose(fast[b], want, atol=1e-5)
            assert torch.allclose(weights[b][..., mask[b]], want_weights, atol=1e-6)
    assert torch.allclose(fast, explicit, atol=1e-6)
    assert weights.shape == (3, 2, 4, 6) and torch.all(weights[~mask[:, None, None, :].expand_as(weights)] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 4))


@pytest.mark.parametrize("variant,text_pool", VARIANTS_AND_POOLS)
def test_fused_scores_and_attention_equal_naive_per_pair_reference(variant, text_pool):
    fusion, head = make_fusion(variant, text_pool=text_pool)
    lengths = [3, 7, 1, 5]
    image, text, mask = make_batch(lengths)
    with torch.no_grad():
        out = fusion(image, text, mask, need_weights=True)
        logits = head(out.pooled)
        for b, n in enumerate(lengths):
            want_logit, want_maps = ref_pair(fusion, head, image[b], text[b, :n])
            assert abs(float(logits[b] - want_logit)) < 1e-5
            assert abs(float(torch.sigmoid(logits[b]) - torch.sigmoid(want_logit))) < 1e-5
            for got, want in zip(out.attention, want_maps, strict=True):
                assert torch.allclose(got[b, :, :n], want, atol=1e-5)
    assert len(out.attention) == 2 and out.attention[0].shape == (4, 2, 7, P)
    assert logits.std() > 1e-3  # the pairs really differ, so the comparison means something


@pytest.mark.parametrize("variant,text_pool", VARIANTS_AND_POOLS)
def test_appending_padding_changes_no_score(variant, text_pool):
    fusion, head = make_fusion(variant, text_pool=text_pool)
    image, text, mask = make_batch([2, 6, 4])
    _, padded_text, padded_mask = make_batch([2, 6, 4], pad_to=11, seed=2)  # other garbage in the padding
    padded_text[:, :6] = text
    with torch.no_grad():
        base = head(fusion(image, text, mask).pooled)
        padded = head(fusion(image, padded_text, padded_mask).pooled)
    assert torch.allclose(base, padded, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_permuting_the_batch_permutes_the_scores(variant):
    fusion, head = make_fusion(variant)
    image, text, mask = make_batch([3, 1, 5, 2, 4])
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        base = head(fusion(image, text, mask).pooled)
        permuted = head(fusion(image[perm], text[perm], mask[perm]).pooled)
    assert torch.allclose(base[perm], permuted, atol=1e-6)


def test_cached_image_keys_values_and_broadcast_query_equal_recomputation():
    fusion, head = make_fusion("text_to_image")
    image, text, mask = make_batch([4, 2, 6])
    with torch.no_grad():
        states = fusion.image_side(image)  # (B, P, D)
        kv = fusion.image_kv(states)  # (B, X, 2, H, P, Dh)
        assert kv.shape == (3, 2, 2, 2, P, 8)
        text_states = fusion.text_side(text, mask)
        cached = head(fusion.cross(states, text_states, mask, image_kv=kv).pooled)
        assert torch.allclose(cached, head(fusion(image, text, mask).pooled), atol=1e-6)
        # one caption (batch 1) against three images, broadcast without copies of the caption
        one = head(fusion.cross(states, text_states[1:2], mask[1:2], image_kv=kv).pooled)
        each = head(fusion(image, text[1:2].expand(3, -1, -1), mask[1:2].expand(3, -1)).pooled)
        assert torch.allclose(one, each, atol=1e-6)


def test_unknown_variant_and_kv_of_joint_variant_are_errors():
    with pytest.raises(ValueError, match="text_to_image"):
        build_fusion(FusionCfg(variant="nope"), DV, DT)
    with pytest.raises(ValueError, match="attention"):
        build_fusion(FusionCfg(text_pool="max"), DV, DT)
    fusion, _ = make_fusion("joint")
    with pytest.raises(ValueError, match="text_to_image"):
        fusion.image_kv(torch.zeros(1, P, 16))


@pytest.mark.parametrize("field", ["heads", "dim", "dim_head", "cross_layers"])
def test_a_fusion_of_zero_width_or_depth_is_refused(field):
    # heads=0 built (0, D) projections that trained and scored nothing, with only a PyTorch warning
    with pytest.raises(ValueError, match=f"fusion.{field} must be positive"):
        build_fusion(FusionCfg(**{field: 0}), DV, DT)


def test_a_fusion_of_zero_width_in_a_cli_command_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["embed", "-t", "a dog", "-m", "tiny", "--set", "fusion.heads=0"])
    assert result.exit_code == 2 and "error: fusion.heads must be positive, not 0" in result.output


def test_grid_positions_are_sin_cos_of_column_and_row():
    """grid_positions(P=9, D=8): channels 0-3 encode the column, 4-7 the row, as sin/cos of geometric frequencies."""
    from mmcross.fusion import grid_positions

    pos = grid_positions(9, 8)  # (P, D), row-major 3x3 grid
    for index in range(9):
        row, col = divmod(index, 3)
        expected = []
        for coord in (col, row):
            freqs = [1.0 / 10000 ** (i / 2) for i in range(2)]
            expected += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
        assert torch.allclose(pos[index], torch.tensor(expected), atol=1e-6)
    assert len({tuple(row.tolist()) for row in pos}) == 9  # every patch has its own position
    with pytest.raises(ValueError, match="square grid"):
        grid_positions(5, 8)


def twin_fusions(flag: str, patches: int) -> tuple[Fusion, Fusion, tuple]:
    """A text_to_image fusion with `flag` on, the same weights with it off, and a batch on a square grid of patches."""
    cfg = FusionCfg(variant="text_to_image", dim=16, heads=2, dim_head=8, mlp_ratio=2.0, **{flag: True})
    torch.manual_seed(0)
    fusion = build_fusion(cfg, DV, DT).eval()
    torch.manual_seed(0)
    plain = build_fusion(FusionCfg(**{**cfg.__dict__, flag: False}), DV, DT).eval()
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, patches, DV, generator=g), torch.randn(2, 6, DT, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    return fusion, plain, (image, text, mask)


def padded_pooled(fusion: Fusion, image, text, mask) -> torch.Tensor:
    """The fusion's pooled output with three garbage padding positions appended to every caption."""
    more_text, more_mask = torch.randn(2, 3, DT), torch.zeros(2, 3, dtype=torch.bool)
    return fusion(image, torch.cat([text, more_text], 1), torch.cat([mask, more_mask], 1)).pooled


def test_grid_positions_change_scores_but_keep_padding_invariance():
    fusion, plain, (image, text, mask) = twin_fusions("grid_positions", patches=4)  # a 2x2 grid
    with torch.no_grad():
        out = fusion(image, text, mask).pooled
        assert not torch.allclose(out, plain(image, text, mask).pooled)
        assert torch.allclose(out, padded_pooled(fusion, image, text, mask), atol=1e-5)


def test_match_head_adds_the_dual_encoder_cosine_with_a_learned_gain():
    from mmcross.fusion import ITC_GAIN_UNIT

    torch.manual_seed(0)
    head = MatchHead(8).eval()
    pooled, itc = torch.randn(4, 16), torch.tensor([0.9, 0.1, -0.3, 0.5])
    with torch.no_grad():
        assert torch.equal(head(pooled, itc), head(pooled))  # the gain starts at 0
        head.itc_gain.fill_(0.5)
        assert torch.allclose(head(pooled, itc), head(pooled) + ITC_GAIN_UNIT * 0.5 * itc, atol=1e-6)
    image, text = pooled.chunk(2, dim=-1)
    widened = torch.cat([image, text, image * text], dim=-1)  # what the MLP sees: both sides and their product
    assert torch.allclose(head(pooled), head.net(widened).squeeze(-1))


def test_a_head_from_itc_starts_as_the_dual_encoder_and_still_learns():
    torch.manual_seed(0)
    head = MatchHead(8, from_itc=True)
    pooled, itc = torch.randn(4, 16), torch.tensor([0.9, 0.1, -0.3, 0.5])
    assert torch.allclose(head(pooled, itc), itc / 0.07, atol=1e-5)  # the ITC logit at CLIP's initial temperature
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled, itc), torch.tensor([1.0, 0, 0, 1]))
    loss.backward()
    assert head.net[-1].weight.grad.abs().sum() > 0 and head.itc_gain.grad != 0  # the zero layer gets gradient


def test_pair_readout_equals_naive_loop_over_ordered_token_pairs():
    """PairReadout: softmax over real pairs i < j of score_first(h_i) + score_second(h_j), each pair's MLP of
    [h_i, h_j, looked_j - looked_i, seen_j - seen_i]; padded tokens take part in no pair."""
    from mmcross.fusion import PairReadout

    torch.manual_seed(0)
    readout = PairReadout(8, hidden=6).eval()
    text, looked, seen = torch.randn(2, 5, 8), torch.rand(2, 5, 2), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        got = readout(text, looked, seen, mask)
        for b in range(2):
            n = int(mask[b].sum())
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            scores = torch.stack(
                [
                    ref_linear(text[b, i], readout.score_first)[0] + ref_linear(text[b, j], readout.score_second)[0]
                    for i, j in pairs
                ]
            )
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            want = torch.zeros(8)
            for w, (i, j) in zip(weights, pairs):
                hidden = (
                    ref_linear(text[b, i], readout.first)
                    + ref_linear(text[b, j], readout.second)
                    + ref_linear(looked[b, j] - looked[b, i], readout.offset)
                    + ref_linear(seen[b, j] - seen[b, i], readout.content)
                )
                want += w * ref_linear(ref_gelu(hidden), readout.out[1])
            assert torch.allclose(got[b], want, atol=1e-5)
        # a caption of one real token has no pair: zeros, not NaN
        assert torch.equal(
            readout(text[:1], looked[:1], seen[:1], torch.tensor([[True] + [False] * 4])), torch.zeros(1, 8)
        )
        # swapping where the first and the second token looked changes the readout: order is visible
        swapped = looked.clone()
        swapped[:, [0, 1]] = looked[:, [1, 0]]
        assert not torch.allclose(readout(text, swapped, seen, mask), got)


def test_pair_readout_in_the_fusion_reads_the_last_cross_layer_and_ignores_padding():
    from mmcross.fusion import grid_coords

    fusion, plain, (image, text, mask) = twin_fusions("pair_readout", patches=9)  # a 3x3 grid
    with torch.no_grad():
        out = fusion(image, text, mask, need_weights=True)
        # the same weights without the readout, plus the readout of the final text states at the looked-at places
        base = plain(image, text, mask).pooled
        states = plain.text_side(text, mask)
        kv = plain.image_kv(plain.image_side(image))
        for i, layer in enumerate(plain.cross_layers):
            states = layer(states, mask, context_kv=kv[:, i])[0]
        looked = out.attention[-1].mean(dim=1) @ grid_coords(9)  # (B, L, 2)
        seen = out.attention[-1].mean(dim=1) @ plain.image_side(image)  # (B, L, D)
        readout = fusion.pairs(fusion.norm_text(states), looked, seen, mask)
        assert torch.allclose(out.pooled, base + torch.cat([torch.zeros_like(readout), readout], -1), atol=1e-5)
        assert torch.allclose(out.pooled, padded_pooled(fusion, image, text, mask), atol=1e-5)
    with pytest.raises(ValueError, match="text_to_image"):
        build_fusion(FusionCfg(variant="joint", pair_readout=True), DV, DT)
    with pytest.raises(ValueError, match="square grid"):
        fusion(torch.randn(1, 5, DV), text[:1], mask[:1])
