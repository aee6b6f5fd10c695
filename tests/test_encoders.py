"""The open_clip encoders against open_clip itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mmcross.config import EncoderCfg
from mmcross.data.flickr import read_token_file
from mmcross.encoders import PretrainedUnavailable, build_open_clip_reference, load_encoders

CAPTIONS = [
    "a dog",
    "two people walk along the beach at sunset while a dog runs ahead of them",
    "red",
    " ".join(["a very long caption that goes on and on"] * 20),  # far past the 77-token context
    "a child in a pink dress is climbing up a set of stairs in an entry way .",
]


@pytest.fixture(scope="module")
def tiny_reference(tiny_cfg):
    return build_open_clip_reference(tiny_cfg.encoder)


def test_text_pooled_equals_open_clip_including_truncated_captions(tiny_encoders, tiny_reference):
    model, tokenizer = tiny_reference
    tokens = tokenizer(CAPTIONS)  # (N, 77)
    with torch.inference_mode():
        expected = model.encode_text(tokens)
        ours = tiny_encoders.text(tokens).pooled
    assert (ours - expected).abs().max() <= 1e-4


def test_text_batch_is_cut_to_longest_caption_and_mask_marks_padding(tiny_encoders):
    short = ["a dog", "two dogs play in the snow"]
    tokens = tiny_encoders.text.tokenize(short)  # (2, 77): start, words, end, then zeros
    lengths = (tokens != 0).sum(dim=1)
    with torch.inference_mode():
        features = tiny_encoders.text(tokens)
    assert features.tokens.shape[1] == int(lengths.max()) < 77
    assert features.mask.dtype == torch.bool
    assert features.mask.sum(dim=1).tolist() == lengths.tolist()
    for row, length in enumerate(lengths.tolist()):
        assert features.mask[row, :length].all() and not features.mask[row, length:].any()


def test_text_tokens_of_a_caption_do_not_depend_on_its_batch(tiny_encoders):
    alone = tiny_encoders.text.tokenize(["a dog"])
    with torch.inference_mode():
        single = tiny_encoders.text(alone)
        batched = tiny_encoders.text(tiny_encoders.text.tokenize(["a dog", CAPTIONS[3]]))
    length = int(single.mask.sum())
    assert torch.allclose(single.tokens[0, :length], batched.tokens[0, :length], atol=1e-5)
    assert torch.allclose(single.pooled[0], batched.pooled[0], atol=1e-5)


def test_a_large_batch_runs_in_length_chunks_with_the_same_results(tiny_encoders, tiny_reference):
    from mmcross.encoders import LENGTH_CHUNK

    model, tokenizer = tiny_reference
    words = "a dog runs through the tall grass near a river under a blue sky".split()
    captions = [" ".join(words[: 1 + i % len(words)]) for i in range(2 * LENGTH_CHUNK + 5)]  # lengths mixed
    tokens = tokenizer(captions)
    with torch.inference_mode():
        chunked = tiny_encoders.text(tokens)
        whole = tiny_encoders.text._forward(tokens, tiny_encoders.text.padding_mask(tokens))
        expected = model.encode_text(tokens)
    assert torch.equal(chunked.mask, whole.mask) and chunked.tokens.shape == whole.tokens.shape
    assert (chunked.pooled - expected).abs().max() <= 1e-4
    assert (chunked.tokens - whole.tokens)[whole.mask].abs().max() <= 1e-4


def test_image_pooled_equals_open_clip_and_tokens_are_patches(tiny_encoders, tiny_reference):
    model, _ = tiny_reference
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = tiny_encoders.image(pixels)
        expected = model.encode_image(pixels)
    assert (features.pooled - expected).abs().max() <= 1e-5
    assert features.tokens.shape == (3, (64 // 8) ** 2, tiny_encoders.image.token_dim)


@torch.no_grad()
def _weights_checksum(encoders) -> float:
    return float(
        sum(p.double().sum() for p in encoders.text.parameters())
        + sum(p.double().sum() for p in encoders.image.parameters())
    )


def test_same_preset_gives_same_weights_in_another_process(tiny_cfg, tiny_encoders):
    code = (
        "from mmcross.config import load_matcher_cfg; from mmcross.encoders import load_encoders;"
        "e = load_encoders(load_matcher_cfg('tiny').encoder);"
        "print(repr(float(sum(p.double().sum() for p in e.text.parameters())"
        " + sum(p.double().sum() for p in e.image.parameters()))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out.strip().splitlines()[-1]) == _weights_checksum(tiny_encoders)
    other_seed = load_encoders(EncoderCfg(model_name=tiny_cfg.encoder.model_name, seed=1))
    assert _weights_checksum(other_seed) != _weights_checksum(tiny_encoders)


def test_local_open_clip_checkpoint_file_is_loaded(tmp_path, tiny_cfg):
    reference, tokenizer = build_open_clip_reference(EncoderCfg(model_name=tiny_cfg.encoder.model_name, seed=7))
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = load_encoders(EncoderCfg(model_name=tiny_cfg.encoder.model_name, pretrained=str(path), seed=0))
    tokens = tokenizer(CAPTIONS)
    with torch.inference_mode():
        assert torch.allclose(loaded.text(tokens).pooled, reference.encode_text(tokens), atol=1e-5)


@pytest.fixture
def no_network(monkeypatch):
    """Simulate a machine that reaches no host: every connection attempt fails at once."""
    import huggingface_hub.constants as hf_constants

    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.mark.parametrize("pretrained", ["laion2b_s34b_b79k", "hf-hub:timm/vit_base_patch32_clip_224.openai"])
def test_offline_pretrained_fails_fast_with_one_clear_line(no_network, pretrained):
    import huggingface_hub.constants as hf_constants

    with pytest.raises(PretrainedUnavailable) as err:
        load_encoders(EncoderCfg(model_name="ViT-B-32", pretrained=pretrained))
    message = str(err.value)
    assert "\n" not in message
    assert pretrained.removeprefix("hf-hub:") in message or pretrained in message
    assert "offline" in message and "--pretrained /path/to/" in message
    assert no_network and hf_constants.HF_HUB_OFFLINE  # we checked reachability once and switched the hub offline


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(PretrainedUnavailable, match="laion2b_s34b_b79k"):
        load_encoders(EncoderCfg(model_name="ViT-B-32", pretrained="no-such-tag"))


@pytest.fixture(scope="module")
def vit_b_32():
    cfg = EncoderCfg(model_name="ViT-B-32", seed=0)
    return load_encoders(cfg).text, build_open_clip_reference(cfg)


@pytest.mark.parametrize("n_captions", [100, pytest.param(500, marks=pytest.mark.slow)])
def test_vit_b_32_text_path_equals_open_clip_on_flickr8k_captions(flickr8k, vit_b_32, n_captions):
    captions = [c for caps in read_token_file(flickr8k / "Flickr8k.token.txt").values() for c in caps][:n_captions]
    ours, (model, tokenizer) = vit_b_32
    tokens = tokenizer(captions)
    with torch.inference_mode():
        expected = torch.cat([model.encode_text(tokens[i : i + 100]) for i in range(0, len(tokens), 100)])
    with torch.inference_mode():
        got = torch.cat([ours(tokens[i : i + 100]).pooled for i in range(0, len(tokens), 100)])
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["RN50", "convnext_base", "coca_ViT-B-32"])
def test_other_tower_kinds_match_open_clip(model_name):
    """ResNet, timm and CoCa towers: pooled outputs equal open_clip's, tokens and masks line up."""
    cfg = EncoderCfg(model_name=model_name, seed=0)
    encoders, (model, tokenizer) = load_encoders(cfg), build_open_clip_reference(cfg)
    tokens = tokenizer(CAPTIONS[:3])
    height, width = encoders.image.image_size
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        text, image = encoders.text(tokens), encoders.image(pixels)
        assert (text.pooled - model.encode_text(tokens, normalize=False)).abs().max() <= 1e-4
        assert (image.pooled - model.encode_image(pixels, normalize=False)).abs().max() <= 1e-4
    assert text.tokens.shape[:2] == text.mask.shape and text.tokens.shape[2] == encoders.text.token_dim
    assert image.tokens.shape[0] == 2 and image.tokens.shape[2] == encoders.image.token_dim


def test_conv_tower_tokens_from_an_earlier_stage_equal_that_stage_of_open_clip():
    """encoder.token_stage: the fusion's tokens are that residual stage's map, row-major; the pooled embedding
    still equals open_clip's `encode_image` (the last stage, attention-pooled)."""
    cfg = EncoderCfg(model_name="mmcross-rn-small-128", seed=0, token_stage=3)
    encoders, (model, _) = load_encoders(cfg), build_open_clip_reference(cfg)
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    visual = model.visual
    with torch.inference_mode():
        image = encoders.image(pixels)
        stage3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))  # (2, 512, 8, 8), NCHW
        assert (image.pooled - model.encode_image(pixels, normalize=False)).abs().max() <= 1e-4
    assert encoders.image.token_dim == stage3.shape[1] == 512 and image.tokens.shape == (2, 64, 512)
    # token p is grid cell (row p // 8, column p % 8): what the grid positions and heat maps assume
    assert (image.tokens[:, 8 * 2 + 5] - stage3[:, :, 2, 5]).abs().max() <= 1e-4
    last = load_encoders(EncoderCfg(model_name="mmcross-rn-small-128", seed=0)).image
    assert last.token_dim == 1024 and last(pixels).tokens.shape == (2, 16, 1024)


@pytest.mark.parametrize("stage", [0, 5])
def test_token_stage_outside_the_tower_is_refused(stage):
    with pytest.raises(ValueError, match="stage 1-4"):
        load_encoders(EncoderCfg(model_name="mmcross-rn-small-128", token_stage=stage))


def test_token_stage_is_refused_for_a_transformer_tower(tiny_cfg):
    with pytest.raises(ValueError, match="ModifiedResNet conv towers only"):
        load_encoders(EncoderCfg(model_name=tiny_cfg.encoder.model_name, token_stage=3))
