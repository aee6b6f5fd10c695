"""Typed configuration: dataclasses, architecture presets, and overrides.

Precedence, lowest first: dataclass defaults < preset or config file < explicit overrides (CLI flags, `--set`).
Presets are JSON files in `mmcross/model_configs/`; the registry is simply that folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "vit-b-32"  # the preset a command uses when none is named


@dataclass
class EncoderCfg:
    """The open_clip dual encoder."""

    model_name: str = "ViT-B-32"  # open_clip architecture name, as listed by `open_clip.list_models()`
    pretrained: str | None = None  # open_clip tag, local checkpoint file or `hf-hub:org/repo`; None = random init
    seed: int = 0  # initialisation seed used when there are no pretrained weights (same preset -> same weights)
    precision: str = "fp32"  # open_clip precision: fp32, fp16, bf16, amp
    # conv towers (ModifiedResNet): the residual stage (1-4) whose feature map gives the fusion its image tokens;
    # None = the last. The pooled embedding always comes from the last stage.
    token_stage: int | None = None


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
    grid_positions: bool = False  # add fixed 2D sin-cos positions to the image tokens (needs a square patch grid)
    pair_readout: bool = False  # text_to_image: relation-network readout over ordered token pairs
    text_pool: str = "mean"  # how text states become one vector: "mean" over real tokens, or learned "attention"
    score_rule: str = "scaled_dot"  # how every fusion attention layer scores a query against a key: "scaled_dot"
    # (q.k / sqrt(Dh)), "additive" (v.tanh(q + k), Bahdanau) or "concat" (w.[q; k]); see fusion.CrossAttention
    head_from_itc: bool = False  # the match head starts as the dual encoder (its logit = the ITC logit) and learns
    # corrections (`fusion.MatchHead`); initialisation only
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
class InferenceCfg:
    """How the encoders run at inference (`--precision`, `--runtime`); training always runs torch fp32."""

    precision: str = "fp32"  # fp32 (exact) or int8 (weights int8 per output channel, activations quantised per batch)
    runtime: str = "auto"  # torch, onnx (ONNX Runtime) or openvino; auto = torch for fp32, onnx for int8


@dataclass
class ModelRef:
    """Which model a command uses, named the one way every command names it; `mmcross.factory.load_matcher` builds
    it. An index manifest stores it whole (with `config` filled in), so `search` rebuilds exactly the model that
    built the index.
    """

    model: str | None = None  # architecture preset (`mmcross models`) or a JSON config file; None = DEFAULT_MODEL,
    # or with a checkpoint its own architecture (a model named beside a checkpoint must be the checkpoint's)
    pretrained: str | None = None  # open_clip weights for the encoders (tag, file, hf-hub:org/repo); None = random
    checkpoint: str | None = None  # a mmcross .safetensors checkpoint or a run directory; it holds its architecture
    overrides: dict[str, Any] = field(default_factory=dict)  # `--set key=value` on top of the architecture
    config: dict[str, Any] | None = None  # the resolved `MatcherCfg` (as `to_dict` gives it); when set, it is the
    # architecture and `model` only says where it came from (a config file may since have moved or changed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRef:
        """Inverse of `to_dict`; also reads the `{"preset", "pretrained", "checkpoint", "config"}` of old manifests."""
        data = dict(data)
        if "preset" in data:
            data["model"] = data.pop("preset") or DEFAULT_MODEL
        return from_dict(cls, data)


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


@dataclass
class TrainCfg:
    """How a matcher is fine-tuned: data, what trains, losses, optimiser, schedule, checkpoints, dev evaluation."""

    data: str = ""  # training dataset (any format `open_dataset` reads); relative paths resolve against the cwd
    format: str = "auto"  # reader of `data` and `eval_data`
    split: str = "train"  # split of `data` to train on
    image_root: str | None = None  # folder relative image paths of `data` and `eval_data` resolve against (a table's
    # paths written for another machine); None = the format's default
    image_col: str | None = None  # table column with the image path; None = first of image, filepath, ... found
    caption_col: str | None = None  # table column with the caption(s); None = first of caption, title, ... found
    eval_data: str | None = None  # dev dataset for periodic evaluation; None = `data`
    eval_split: str | None = "dev"  # split of `eval_data`; None = no periodic evaluation
    eval_max_images: int = 1000  # evaluate on the first N dev images (all of their captions)
    eval_every: int = 0  # evaluate every N optimiser steps (0 = only at the end); best.safetensors keeps the best
    eval_rerank_k: int = 16  # re-rank this many dual-encoder candidates by the fusion score during dev evaluation
    trainable: str = "all"  # "fusion": encoders frozen; "last_n": fusion + last `last_n_blocks` blocks of each tower
    last_n_blocks: int = 2  # encoder blocks per tower that train when trainable = "last_n"
    feature_cache: bool = False  # with trainable = "fusion": encode every image and caption once, train on the cache
    augment: bool = True  # random resized crops (as open_clip's training transform) instead of the eval transform
    augment_min_scale: float = 0.9  # smallest area share a random crop keeps (open_clip's default 0.9)
    augment_hflip: bool = False  # with `augment`: mirror each crop left-right with probability 1/2
    caption_word_drop: float = 0.0  # delete each word of a training caption with this probability (one always
    # stays); a regulariser for a text tower that would otherwise memorise a few thousand captions
    decode_cache: str = "auto"  # where decoded training images are kept ("auto": $MMCROSS_CACHE/decoded, else
    # ~/.cache/mmcross/decoded; "none": decode every image at every step); see `mmcross.data.decoded`
    decode_cache_max_gb: float = 8.0  # a training set whose decoded array would be larger streams from its files
    batch_size: int = 64  # (image, caption) rows per micro-batch per process (an epoch shows every caption)
    captions_per_image: int = 1  # captions of one image in a micro-batch (consecutive rows; the image tower runs
    # once for them and they are never one another's negatives): batch_size / captions_per_image distinct images
    accum_steps: int = 1  # micro-batches per optimiser step (effective batch = batch_size * accum_steps * world)
    max_steps: int = 1000  # optimiser steps; the cosine schedule ends here
    max_minutes: float = 0.0  # stop (and checkpoint, evaluate) after this much wall time; 0 = no limit
    lr: float = 5e-4  # peak learning rate of the fusion block, head and temperature
    encoder_lr: float | None = None  # peak learning rate of trainable encoder weights; None = `lr`
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, embeddings or temperature)
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to `min_lr_ratio * lr`
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    itc_weight: float = 1.0  # weight of the InfoNCE image-text contrastive loss
    itm_weight: float = 1.0  # weight of the ITM loss (BCE on positives + ITC-sampled hard negatives)
    itm_uniform_negatives: float = 0.0  # share of ITM negatives drawn uniformly from the batch instead (easy ones)
    itm_detach: bool = False  # ITM trains the fusion and head only; the encoders learn from ITC (and VSE) alone
    itm_start: float = 0.0  # share of `max_steps` done before the ITM loss turns on; earlier steps skip the fusion
    # (ITC and VSE alone, a cheaper step) and do not count as head training. A share, so a shorter schedule keeps it;
    # 1.0 (with `fusion_steps`): the ITM only in the fusion phase
    fusion_steps: int = 0  # after `max_steps`, a fusion phase of this many more steps: the encoders frozen, every
    # training image (eval transform) and caption encoded once, the fusion and head trained alone on those features
    # by the ITM (`mmcross.train.fusion_phase`); 0 = none. With `itm_start` 1.0 the fusion learns in this phase only
    fusion_batch_size: int = 128  # rows (one caption per image) per step of the fusion phase
    fusion_lr: float | None = None  # peak learning rate of the fusion phase (its own warm-up + cosine); None = `lr`
    fusion_warmup_steps: int = 50  # linear warm-up steps of the fusion phase's schedule
    neighbour_batches: int = 0  # with the feature cache (the fusion phase, or trainable = "fusion"): batches of
    # neighbourhoods, each drawn image with this many images drawn from its 16 nearest (frozen image embeddings), so
    # the ITM's in-batch negatives are the look-alikes a re-rank must tell apart; 0 = random batches
    paraphrase_cosine: float = 0.0  # with the feature cache: a caption whose frozen text embedding is at least this
    # cosine from one of image i's own captions counts as true of image i (a paraphrase), never its negative; 0 = off
    paraphrase_share: float = 0.0  # instead of `paraphrase_cosine`: the cosine is set so this share of the pairs of
    # an image and another image's caption in the run's first 32 batches count as paraphrases (it carries across text
    # towers, whose cosines differ); the run's log says the cosine it chose; 0 = off
    itm_rank_weight: float = 0.0  # ITM also ranks: softplus(negative - positive logit) per drawn negative and its
    # anchor, the order re-ranking needs (`mmcross.losses.itm_loss`)
    vse_weight: float = 0.0  # weight of the VSE++ max-violation triplet loss (MMCA's loss); 0 = off
    dataset_negatives: bool = False  # ITM also on every caption of each image and its own hard negative (the
    # `negatives` column of a JSONL manifest, e.g. `mmcross data synth`'s attribute-swapped captions)
    vse_margin: float = 0.2  # margin of the VSE++ loss
    init_temperature: float = 0.07  # initial ITC temperature (learned, as log(1/T), clamped to T >= 0.01)
    seed: int = 0  # data order, augmentation, hard-negative sampling, dropout
    workers: int = 0  # DataLoader worker processes decoding images (streaming and dev evaluation; not needed with
    # the decode cache, whose one-time build uses every core)
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16": also on a CPU that runs bf16
    # natively (AVX512-BF16 or AMX: 1.6x the pairs/s; elsewhere fp32, with a warning); "off": fp32 everywhere.
    # Weights, gradients and AdamW stay fp32
    threads: int = 0  # torch intra-op threads of the training process; 0 = every core
    ckpt_every: int = 0  # write last.safetensors + optimiser state every N steps (0 = only at the end)
    log_every: int = 10  # write a JSONL log line every N steps
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1


@dataclass
class RunCfg:
    """A run config (`configs/*.yaml`): which model, which weights, architecture overrides and training settings."""

    model: str = "tiny"  # architecture preset or JSON config file
    pretrained: str | None = None  # open_clip weights for the encoders; None = seeded random init
    matcher: dict[str, Any] = field(default_factory=dict)  # MatcherCfg overrides, e.g. {"fusion.dim": 64}
    train: TrainCfg = field(default_factory=TrainCfg)

    def model_ref(self) -> ModelRef:
        """The model this run trains, as every command names a model."""
        return ModelRef(model=self.model, pretrained=self.pretrained, overrides=dict(self.matcher))


def load_run_cfg(
    path: str | Path | None = None, overrides: dict[str, str] | None = None, base: RunCfg | None = None
) -> RunCfg:
    """Defaults < the YAML run config at `path` (or `base`, e.g. a run's saved config) < `overrides` (`--set`).

    YAML values are read as the fields' types, as `--set` values are (`lr: 1e-3`, which YAML leaves a string, is a
    float). Override keys naming a `RunCfg` field (`train.lr`, `model`, `pretrained`) set it; any other key
    (`fusion.dim`, `encoder.model_name`) is a `MatcherCfg` override and joins `matcher`.
    """
    data: dict[str, Any] = {}
    if base is not None:
        data = to_dict(base)
    elif path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such run config: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"run config {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"run config {path} must be a mapping")
        if isinstance(data.get("train"), dict) and data["train"].get("autocast") is False:
            data["train"]["autocast"] = "off"  # YAML 1.1 reads a bare `off` (the documented setting) as False
    matcher = data.pop("matcher", None) or {}
    if not isinstance(matcher, dict):
        raise ValueError(f"matcher: a mapping of architecture overrides (fusion.dim: 64), not {matcher!r}")
    cfg = from_dict(RunCfg, data)
    cfg.matcher = flatten_dotted(matcher)
    run_keys, matcher_keys = {}, {}
    for key, value in (overrides or {}).items():
        (run_keys if key.split(".")[0] in ("model", "pretrained", "train") else matcher_keys)[key] = value
    cfg = apply_overrides(cfg, run_keys)
    cfg.matcher = {**cfg.matcher, **matcher_keys}
    return cfg


def flatten_dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys, the form `apply_overrides` and `--set` take.

    `{"fusion": {"dim": 64}}` -> `{"fusion.dim": 64}`; values that are not mappings (lists included) are kept whole.
    """
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def list_presets() -> list[str]:
    """Names of the architecture presets shipped with mmcross."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def train_data_cfg(cfg: TrainCfg, split: str | None = None) -> DataCfg:
    """How a training run reads `train.data` (and `eval_data`): its format, image root and table columns."""
    return DataCfg(
        format=cfg.format, split=split, image_root=cfg.image_root, image_col=cfg.image_col, caption_col=cfg.caption_col
    )


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are an error, missing keys take defaults.

    Values are read as the fields' types (`typed`): an empty section (None) is the defaults, a value that cannot be
    read is one error naming the field (`prefix` + its name).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        known = ", ".join(sorted(names))
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}; known: {known}")
    kwargs = {}
    for key, value in data.items():
        hint, name = hints[key], prefix + key
        if dataclasses.is_dataclass(hint):
            if value is None:  # `train:` with nothing under it
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{name}: a mapping of {hint.__name__} fields, not {value!r}")
            kwargs[key] = from_dict(hint, value, name + ".")
        else:
            kwargs[key] = typed(value, hint, name)
    return cls(**kwargs)


def typed(value: Any, hint: Any, name: str) -> Any:
    """`value` as the type `hint` declares: an int where a float is declared is a float, a whole float an int, a
    string is parsed as `--set` parses it (YAML leaves `1e-3` a string); anything else is one error naming `name`.
    Values of container or `Any` fields are kept as given."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for option in options:
        if option in (bool, str) and isinstance(value, option):
            return value
        if option is int and number and (isinstance(value, int) or value.is_integer()):
            return int(value)
        if option is float and number:
            if not math.isfinite(value):
                raise NotFinite(f"{name}: {value} is not a finite number")
            return float(value)
        if option not in (bool, int, float, str, type(None)):
            return value  # dict, tuple, Any: not checked here
    if isinstance(value, str):
        try:
            return _coerce(value, hint)
        except NotFinite as err:
            raise NotFinite(f"{name}: {err}") from None
        except ValueError:
            pass
    kinds = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{name}: cannot read {value!r} as {kinds}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


class NotFinite(ValueError):
    """A NaN or infinite number given for a config field."""


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
                number = option(text)
            except ValueError:
                continue
            if not math.isfinite(number):  # a NaN weight ranks every pair first; inf reaches a loss or a score
                raise NotFinite(f"{text!r} is not a finite number")
            return number
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
        if isinstance(value, str):  # a --set value: parsed as the field's type ("" and "none" clear an optional)
            try:
                value = _coerce(value, hints[last])
            except ValueError as err:
                raise ValueError(f"{dotted}: {err}") from None
        else:  # a YAML or JSON value (a run config's `matcher:`): checked as from_dict checks the rest
            value = typed(value, hints[last], dotted)
        setattr(target, last, value)
    return cfg


def load_matcher_cfg(preset: str, overrides: dict[str, Any] | None = None) -> MatcherCfg:
    """Load a preset by name (see `list_presets`) or a JSON config file, then apply overrides."""
    path = PRESET_DIR / f"{preset}.json"
    if not path.is_file():
        path = Path(preset)
        if not path.is_file():
            presets = ", ".join(list_presets())
            raise ValueError(f"unknown model preset {preset!r} (and no such config file); presets: {presets}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"model config {path} is not JSON ({err}); --model takes a preset or a JSON config file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must be a JSON object of MatcherCfg fields, not {type(data).__name__}")
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


def tokenizer_architecture(name: str) -> str | None:
    """The open_clip architecture whose tokenizer a preset uses (an architecture name is kept); None for "none"."""
    if name.lower() == "none":
        return None
    if (PRESET_DIR / f"{name}.json").is_file():
        return load_matcher_cfg(name).encoder.model_name
    return name
