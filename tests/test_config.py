"""Config precedence: dataclass defaults < preset or config file < --set < --pretrained."""

from __future__ import annotations

import json

import pytest

from mmcross.config import FusionCfg, MatcherCfg, apply_overrides, list_presets, load_matcher_cfg, parse_set_options
from mmcross.factory import resolve_cfg


def test_presets_include_tiny_and_vit_b_32():
    assert {"tiny", "vit-b-32"} <= set(list_presets())


def test_preset_overrides_defaults_and_unset_fields_keep_defaults(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"fusion": {"cross_layers": 5}, "itc_weight": 0.5}))
    cfg = load_matcher_cfg(str(path))
    assert cfg.fusion.cross_layers == 5 and cfg.itc_weight == 0.5  # from the file
    assert cfg.fusion.heads == FusionCfg().heads and cfg.encoder == MatcherCfg().encoder  # defaults
    assert cfg.name == "mine"


def test_set_overrides_preset_and_pretrained_overrides_set():
    tiny = load_matcher_cfg("tiny")
    cfg = resolve_cfg("tiny", None, parse_set_options(["fusion.cross_layers=7", "encoder.seed=3", "itc_weight=0"]))
    assert (cfg.fusion.cross_layers, cfg.encoder.seed, cfg.itc_weight) == (7, 3, 0.0)
    assert cfg.fusion.dim == tiny.fusion.dim  # untouched preset value
    assert tiny.fusion.cross_layers != 7  # the loaded preset itself is not mutated
    cfg = resolve_cfg("tiny", "/tmp/w.safetensors", {"encoder.pretrained": "laion2b_s34b_b79k"})
    assert cfg.encoder.pretrained == "/tmp/w.safetensors"


def test_override_types_are_parsed_and_bad_keys_rejected():
    cfg = apply_overrides(MatcherCfg(), {"encoder.pretrained": "none", "fusion.dropout": "0.1"})
    assert cfg.encoder.pretrained is None and cfg.fusion.dropout == 0.1
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(MatcherCfg(), {"fusion.nope": "1"})
    with pytest.raises(ValueError, match="cannot read"):
        apply_overrides(MatcherCfg(), {"fusion.heads": "many"})
    with pytest.raises(ValueError, match="key=value"):
        parse_set_options(["fusion.heads"])


def test_unknown_preset_and_unknown_file_field_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        load_matcher_cfg("no-such-preset")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"fusion": {"layers": 2}}))
    with pytest.raises(ValueError, match="unknown FusionCfg field"):
        load_matcher_cfg(str(path))


@pytest.mark.parametrize("name", ["demo-synth", "flickr8k-scratch", "flickr30k-finetune"])
def test_shipped_run_configs_load_and_pass_the_checks(name):
    from pathlib import Path

    from mmcross.config import load_run_cfg
    from mmcross.train.loop import check_cfg

    cfg = load_run_cfg(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    check_cfg(cfg.train)  # every field known, every value in range, before anything is built
    resolve_cfg(cfg.model, None, cfg.matcher)  # its model and matcher overrides resolve
