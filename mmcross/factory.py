"""Presets to models: `list_models()` and `resolve_cfg()`; `create_matcher` joins when the fusion head lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmcross.config import MatcherCfg, apply_overrides, list_presets, load_matcher_cfg
from mmcross.encoders import architecture_summary


@dataclass
class PresetInfo:
    name: str  # preset name, e.g. "tiny"
    encoder: str  # open_clip architecture
    embed_dim: int  # size of the dual-encoder embedding
    params: int  # parameters of both encoders
    description: str


def list_models() -> list[PresetInfo]:
    """The architecture presets with their encoder, embedding size and parameter count."""
    infos = []
    for name in list_presets():
        cfg = load_matcher_cfg(name)
        summary = architecture_summary(cfg.encoder.model_name)
        infos.append(
            PresetInfo(
                name=name,
                encoder=cfg.encoder.model_name,
                embed_dim=summary["embed_dim"],
                params=summary["image_params"] + summary["text_params"],
                description=cfg.description,
            )
        )
    return infos


def resolve_cfg(preset: str, pretrained: str | None = None, overrides: dict[str, Any] | None = None) -> MatcherCfg:
    """Preset (or config file) < `overrides` (`--set key=value`) < `pretrained` (`--pretrained`)."""
    cfg = load_matcher_cfg(preset, overrides)
    if pretrained is not None:
        cfg = apply_overrides(cfg, {"encoder.pretrained": pretrained})
    return cfg
