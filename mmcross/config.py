"""Typed configuration: dataclasses, architecture presets, and overrides.

Precedence, lowest first: dataclass defaults < preset or config file < explicit overrides (CLI flags, `--set`).
Presets are JSON files in `mmcross/model_configs/`; the registry is simply that folder.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "model_configs"


@dataclass
class EncoderCfg:
    """The open_clip dual encoder."""

    model_name: str = "ViT-B-32"  # open_clip architecture name, as listed by `open_clip.list_models()`
    pretrained: str | None = None  # open_clip tag, local checkpoint file or `hf-hub:org/repo`; None = random init
    seed: int = 0  # initialisation seed used when there are no pretrained weights (same preset -> same weights)
    precision: str = "fp32"  # open_clip precision: fp32, fp16, bf16, amp


@dataclass
class FusionCfg:
    """The MMCA-style cross-attention fusion block and its match head."""

    variant: str = "joint"  # "joint": MMCA attention over [image; text]; "text_to_image": text attends to image (BLIP)
    dim: int = 256  # fusion width; encoder token states are projected to it
    self_layers: int = 1  # intra-modal self-attention layers per modality
    cross_layers: int = 2  # cross-modal layers
    heads: int = 4  # attention heads
    dim_head: int = 64  # width of one head
    mlp_ratio: float = 4.0  # feed-forward width as a multiple of `dim`
    dropout: float = 0.0  # dropout in attention and feed-forward layers
    seed: int = 0  # initialisation seed of the fusion block and match head (same config -> same weights)


@dataclass
class MatcherCfg:
    """A whole matcher: encoders, fusion, and how the ranking score combines ITC and ITM."""

    name: str = "custom"  # preset name, or "custom" for a config built by hand
    description: str = ""  # one line shown by `mmcross models`
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    fusion: FusionCfg = field(default_factory=FusionCfg)
    itc_weight: float = 1.0  # ranking score = itm + itc_weight * itc; itm = sigmoid(match logit), itc = cosine


@dataclass
class DataCfg:
    """Where a dataset's images and captions are and how its images are decoded."""

    format: str = "auto"  # reader: auto, flickr, karpathy, coco, table, folder, wds (`auto` detects the layout)
    split: str | None = None  # train, dev (alias val) or test; None = every record, those without a split included
    image_root: str | None = None  # folder that relative image paths resolve against; None = the format's default
    image_col: str | None = None  # table column with the image path; None = first of image, filepath, ... found
    caption_col: str | None = None  # table column with the caption(s); None = first of caption, title, ... found
    max_image_pixels: int = 89_478_485  # width * height above this is a decompression-bomb reject (PIL's default)
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this RGB colour


def list_presets() -> list[str]:
    """Names of the architecture presets shipped with mmcross."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are an error, missing keys take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        known = ", ".join(sorted(names))
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}; known: {known}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        kwargs[key] = from_dict(hint, value) if dataclasses.is_dataclass(hint) and isinstance(value, dict) else value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _coerce(text: str, hint: Any) -> Any:
    """Parse a command-line string into the type a dataclass field declares."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        elif option in (int, float):
            try:
                return option(text)
            except ValueError:
                continue
        elif option is str:
            return text
    raise ValueError(f"cannot read {text!r} as {hint}")


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of `cfg` with dotted-key overrides applied, e.g. {"fusion.cross_layers": "3"}.

    String values are parsed to the field's declared type; other values are used as given.
    """
    cfg = dataclasses.replace(cfg)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        target = cfg
        for part in path:
            child = getattr(target, part, None)
            if not dataclasses.is_dataclass(child):
                raise ValueError(f"unknown config key {dotted!r}")
            child = dataclasses.replace(child)
            setattr(target, part, child)
            target = child
        hints = typing.get_type_hints(type(target))
        if last not in hints:
            raise ValueError(f"unknown config key {dotted!r}; known at that level: {', '.join(sorted(hints))}")
        setattr(target, last, _coerce(value, hints[last]) if isinstance(value, str) else value)
    return cfg


def load_matcher_cfg(preset: str, overrides: dict[str, Any] | None = None) -> MatcherCfg:
    """Load a preset by name (see `list_presets`) or a JSON config file, then apply overrides."""
    path = PRESET_DIR / f"{preset}.json"
    if not path.is_file():
        path = Path(preset)
        if not path.is_file():
            presets = ", ".join(list_presets())
            raise ValueError(f"unknown model preset {preset!r} (and no such config file); presets: {presets}")
    data = json.loads(path.read_text())
    data.setdefault("name", path.stem)
    cfg = from_dict(MatcherCfg, data)
    return apply_overrides(cfg, overrides or {})


def parse_set_options(items: list[str]) -> dict[str, str]:
    """Turn `["fusion.heads=8", ...]` (repeatable `--set` options) into an override dict."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides
