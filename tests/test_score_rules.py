"""The three attention score rules: naive per-element references, masking, padding, gradients, checkpoints, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from train_helpers import make_shapes, short_run
from typer.testing import CliRunner

from cli import app
from mmcross.config import ModelRef
from mmcross.encode import encode_pixels, encode_texts
from mmcross.factory import create_matcher, load_checkpoint, load_matcher, save_checkpoint
from mmcross.fusion import SCORE_RULES, CrossAttention

runner = CliRunner()
H, DH = 2, 4


def attention(rule: str, seed: int = 0) -> CrossAttention:
    torch.manual_seed(seed)
    return CrossAttention(8, context_dim=6, heads=H, dim_head=DH, score_rule=rule).eval()


def naive(att: CrossAttention, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor):
    """Output (B, N, D) and weights (B, H, N, M) by loops over batch, heads, queries and keys."""
    wq, wkv = att.to_q.weight, att.to_kv.weight  # (H*Dh, D), (2*H*Dh, Dc)
    b, n, _ = x.shape
    m = context.shape[1]
    weights = torch.zeros(b, H, n, m)
    heads_out = torch.zeros(b, n, H * DH)
    for bi in range(b):
        for h in range(H):
            rows = slice(h * DH, (h + 1) * DH)
            for i in range(n):
                q = wq[rows] @ x[bi, i]
                scores = []
                for j in range(m):
                    k = wkv[rows] @ context[bi, j]
                    if not mask[bi, j]:
                        scores.append(-math.inf)
                    elif att.score_rule == "scaled_dot":
                        scores.append(float(q @ k) / math.sqrt(DH))
                    elif att.score_rule == "additive":
                        scores.append(float(att.score_v[h] @ torch.tanh(q + k)))
                    else:
                        scores.append(float(att.score_q[h] @ q + att.score_k[h] @ k))
                w = torch.tensor(scores).softmax(0)
                weights[bi, h, i] = w
                for j in range(m):
                    v = wkv[H * DH + h * DH : H * DH + (h + 1) * DH] @ context[bi, j]
                    heads_out[bi, i, rows] += w[j] * v
    return att.to_out(heads_out), weights


@pytest.mark.parametrize("rule", SCORE_RULES)
def test_each_rule_equals_its_naive_reference_with_masked_keys(rule):
    att = attention(rule)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    with torch.no_grad():
        out, weights = att.attend(x, att.project_kv(context), mask, need_weights=True)
        fast, _ = att.attend(x, att.project_kv(context), mask)  # SDPA for scaled_dot, the same explicit path else
        want_out, want_weights = naive(att, x, context, mask)
    assert torch.allclose(weights, want_weights, atol=1e-6) and torch.allclose(out, want_out, atol=1e-5)
    assert torch.allclose(fast, out, atol=1e-5)
    assert (weights[0, :, :, 3:] == 0).all()  # padded keys never get weight
    # padding invariance: more padded keys, holding anything, change nothing
    padded = torch.cat([context, 100 * torch.randn(2, 2, 6, generator=g)], dim=1)
    with torch.no_grad():
        again, _ = att.attend(x, att.project_kv(padded), torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], 1))
    assert torch.allclose(again, out, atol=1e-5)
    if rule == "concat":  # the softmax over keys cancels the query term: every query gets the same weights
        assert torch.allclose(weights, weights[:, :, :1].expand_as(weights), atol=1e-6)


@pytest.mark.parametrize("rule", SCORE_RULES)
def test_gradients_reach_every_weight_but_the_concat_query_term(rule):
    att = attention(rule).train()
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    att(x, context, torch.ones(2, 5, dtype=torch.bool)).pow(2).sum().backward()
    for name, p in att.named_parameters():
        if name == "score_q":  # concat: the query term adds the same constant to every key's score
            assert p.grad.abs().max() < 1e-6
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_rule_gives_todays_scores():
    """The scaled dot product is the default, and a seeded tiny matcher scores pairs as before the rule was
    selectable (logits pinned from the code before it, same seeds); no parameter is added."""
    captions = ["a dog runs on the grass", "red", "a man in a blue shirt rides a bike down a hill"]
    pinned = {"joint": [0.283307, 0.092169, 0.10201], "text_to_image": [0.367031, 0.345206, 0.355362]}
    for variant, want in pinned.items():
        matcher = create_matcher("tiny", overrides={"fusion.variant": variant})
        assert matcher.cfg.fusion.score_rule == "scaled_dot"
        assert not [k for k in matcher.state_dict() if ".score_" in k]
        images = torch.randn(3, 3, *matcher.image_encoder.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = matcher.match(images, captions).itm_logit
        assert got.tolist() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("variant", ["joint", "text_to_image"])
@pytest.mark.parametrize("rule", ["additive", "concat"])
def test_rerank_from_cached_keys_equals_per_pair_under_every_rule(variant, rule):
    matcher = create_matcher("tiny", overrides={"fusion.variant": variant, "fusion.score_rule": rule})
    images = torch.randn(4, 3, *matcher.image_encoder.image_size, generator=torch.Generator().manual_seed(0))
    cache = encode_pixels(matcher, images, prepare=True)  # text_to_image: per-layer image keys/values cached
    assert (cache.kv is not None) == (variant == "text_to_image")
    got = matcher.rerank("a red square left of a circle", cache, batch_size=3)
    with torch.no_grad():
        want = torch.cat([matcher.match(images[i : i + 1], ["a red square left of a circle"]).score for i in range(4)])
    assert torch.allclose(got.score, want, atol=1e-5)
    texts = encode_texts(matcher, ["a dog", "two cats on a mat"], prepare=True)
    maps = matcher.rerank(images[0], texts, return_attention=True).attention
    assert maps and torch.isfinite(maps[-1]).all()


def test_checkpoint_keeps_the_rule_and_another_rule_is_refused_naming_both(tmp_path):
    matcher = create_matcher("tiny", overrides={"fusion.score_rule": "additive"})
    path = save_checkpoint(matcher, tmp_path / "additive.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.cfg.fusion.score_rule == "additive"
    assert torch.equal(
        loaded.fusion.cross_layers[0].self_attn.score_v, matcher.fusion.cross_layers[0].self_attn.score_v
    )
    with pytest.raises(ValueError, match="additive scores.*not the expected.*scaled_dot scores"):
        load_checkpoint(path, expected="tiny")
    with pytest.raises(ValueError, match="concat scores.*holds.*additive scores"):
        load_matcher(ModelRef(checkpoint=str(path), overrides={"fusion.score_rule": "concat"}))
    with pytest.raises(ValueError, match="unknown fusion.score_rule 'cosine'"):
        create_matcher("tiny", overrides={"fusion.score_rule": "cosine"})


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_rule_works_through_every_command(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", n_train=8, n_dev=4, size=32)
    run = short_run(manifest, {"train.batch_size": "4", "train.augment": "false"}, max_steps=2)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": "tiny", "train": run.train.__dict__}))
    run_dir = tmp_path / "run"
    _ok(["train", "--config", str(config), "--out", str(run_dir), "--set", "fusion.score_rule=additive"])
    assert load_checkpoint(run_dir / "last.safetensors").cfg.fusion.score_rule == "additive"
    report = json.loads(_ok(["eval", str(manifest), "--split", "dev", "--checkpoint", str(run_dir), "--rerank", "4"]))
    assert report["rerank_metrics"] is not None
    index = tmp_path / "index"
    _ok(["index", str(manifest), "--out", str(index), "--checkpoint", str(run_dir), "-j", "0"])
    hits = json.loads(_ok(["search", str(index), "--text", "a red square", "--rerank", "4", "--json"]))["hits"]
    assert hits and all(h["itm"] is not None for h in hits)
    pairs = tmp_path / "shapes" / "pairs.jsonl"  # image paths resolve against its folder
    pairs.write_text(json.dumps({"image": "images/000.png", "caption": "a red square"}) + "\n")
    _ok(["score", str(pairs), "--out", str(tmp_path / "s.jsonl"), "--checkpoint", str(run_dir)])
    assert json.loads((tmp_path / "s.jsonl").read_text())["itm"] is not None
    image = tmp_path / "shapes" / "images" / "000.png"
    assert Image.open(image).size == (32, 32)
    out = _ok(
        [
            "explain",
            str(image),
            "a red square",
            "--model",
            "tiny",
            "--set",
            "fusion.score_rule=concat",
            "--out",
            str(tmp_path / "heat.png"),
        ]
    )
    assert "itm" in out and (tmp_path / "heat.png").is_file()
