"""Checkpoints: safetensors + config in the metadata; exact round trip; other architectures and pickles refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmcross.config import apply_overrides, to_dict
from mmcross.factory import create_matcher, load_checkpoint, save_checkpoint

OVERRIDES = {"fusion.variant": "text_to_image", "fusion.seed": "3", "itc_weight": "0.5"}
CAPTIONS = ["a dog runs on the grass", "a red car", "two children play football in a park near a lake"]


@pytest.fixture(scope="module")
def tiny_matcher():
    return create_matcher("tiny", overrides=OVERRIDES)


@pytest.fixture(scope="module")
def checkpoint(tiny_matcher, tmp_path_factory) -> Path:
    return save_checkpoint(tiny_matcher, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", {"step": "12"})


class WritesMarker:
    """Unpickling this creates a file: the proof that a loader ran code from the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_round_trip_rebuilds_the_model_from_the_checkpoint_alone(tiny_matcher, checkpoint):
    loaded = load_checkpoint(checkpoint)
    assert loaded.cfg == tiny_matcher.cfg and loaded.fusion.variant == "text_to_image"
    images = torch.randn(3, 3, *tiny_matcher.image_encoder.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = tiny_matcher.match(images, CAPTIONS), loaded.match(images, CAPTIONS)
    for name in ("itc", "itm_logit", "score"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    want_state = tiny_matcher.state_dict()
    assert all(torch.equal(v, want_state[k]) for k, v in loaded.state_dict().items())
    assert load_checkpoint(checkpoint, expected=tiny_matcher.cfg).cfg == tiny_matcher.cfg


def test_checkpoint_metadata_holds_the_config(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mmcross.matcher" and meta["step"] == "12"
    assert json.loads(meta["config"])["fusion"]["variant"] == "text_to_image"


def test_another_architecture_is_refused_naming_both(checkpoint, tiny_matcher):
    with pytest.raises(ValueError, match=r"holds tiny \(mmcross-tiny.*expected vit-b-32 \(ViT-B-32"):
        load_checkpoint(checkpoint, expected="vit-b-32")
    deeper = apply_overrides(tiny_matcher.cfg, {"fusion.cross_layers": 3})
    with pytest.raises(ValueError, match="2 cross layers.*not the expected.*3 cross layers"):
        load_checkpoint(checkpoint, expected=deeper)
    with pytest.raises(ValueError, match="text_to_image.*not the expected.*joint"):
        load_checkpoint(checkpoint, expected="tiny")  # the preset's default variant


def test_a_conv_tower_taking_tokens_from_another_stage_is_another_architecture(tmp_path):
    stage3 = create_matcher("rn-small-128", overrides={"encoder.token_stage": 3})
    path = save_checkpoint(stage3, tmp_path / "stage3.safetensors")
    assert load_checkpoint(path, expected=stage3.cfg).image_encoder.token_dim == 512
    with pytest.raises(ValueError, match="tokens from stage 3.*not the expected rn-small-128 \\(mmcross-rn-small-128,"):
        load_checkpoint(path, expected="rn-small-128")


def test_tensors_that_do_not_fit_the_stated_architecture_are_refused(tmp_path, tiny_matcher):
    state = {k: v.contiguous() for k, v in tiny_matcher.state_dict().items()}
    cfg = apply_overrides(tiny_matcher.cfg, {"fusion.cross_layers": 3})
    meta = {"format": "mmcross.matcher", "format_version": "1", "config": json.dumps(to_dict(cfg))}
    path = tmp_path / "liar.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="3 cross layers.*do not fit.*cross_layers.2"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.safetensors", "evil"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_checkpoints_are_refused_without_running_them(tmp_path, name, writer):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(WritesMarker(control)))
    assert control.exists()  # the payload is live: loading it would run code

    marker = tmp_path / "marker"
    path = tmp_path / name
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": WritesMarker(marker)}))
    else:
        torch.save({"state_dict": WritesMarker(marker)}, path)
    with pytest.raises(ValueError, match="refusing.*never"):
        load_checkpoint(path)
    assert not marker.exists()


def test_safetensors_without_mmcross_metadata_and_missing_files_are_refused(tmp_path, tiny_matcher):
    path = tmp_path / "open_clip_model.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="without mmcross metadata.*--pretrained"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(tiny_matcher, tmp_path / "model.pt")
