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


def test_run_config_yaml_values_are_read_as_the_fields_types(tmp_path):
    from mmcross.config import load_run_cfg

    path = tmp_path / "run.yaml"
    # YAML reads 1e-3 as a string, 16.0 as a float, a bare off as False and 'no' as a string
    path.write_text("train:\n  lr: 1e-3\n  batch_size: 16.0\n  autocast: off\n  augment: 'no'\n  max_minutes: 2\n")
    cfg = load_run_cfg(path).train
    assert (cfg.lr, cfg.batch_size, cfg.autocast, cfg.augment, cfg.max_minutes) == (1e-3, 16, "off", False, 2.0)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.max_minutes, float)
    path.write_text("model: tiny\ntrain:\n")  # an empty section: the defaults
    assert load_run_cfg(path).train.batch_size == 64
    for text, message in [
        ("train:\n  batch_size: 16.5\n", r"train.batch_size: cannot read 16.5 as int"),
        ("train:\n  lr: fast\n", "train.lr: cannot read 'fast' as float"),
        ("train:\n  augment: maybe\n", "train.augment: cannot read 'maybe' as bool"),
        ("train:\n  data: [a, b]\n", "train.data: cannot read"),
        ("train: 5\n", "train: a mapping of TrainCfg fields"),
        ("matcher: [1]\n", "matcher: a mapping of architecture overrides"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_run_cfg(path)
