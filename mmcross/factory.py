"""Presets to models: `list_models()`, `create_matcher()`, `load_matcher(ModelRef)`, checkpoints, fingerprints.

A checkpoint is one safetensors file: the matcher's whole state dict (encoders, fusion, head) as tensors, and in
the file's metadata `format` = "mmcross.matcher", `format_version`, `mmcross_version`, and `config`, the
`MatcherCfg` as JSON, so `load_checkpoint(path)` alone rebuilds the model (nanoGPT's `model_args` idea). Nothing
is ever unpickled: files named like pickles or whose header is not safetensors are refused before any load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcross import __version__
from mmcross.config import (
    DEFAULT_MODEL,
    InferenceCfg,
    MatcherCfg,
    ModelRef,
    apply_overrides,
    flatten_dotted,
    from_dict,
    list_presets,
    load_matcher_cfg,
    to_dict,
)
from mmcross.encoders import Encoders, load_encoders
from mmcross.fusion import MatchHead, build_fusion
from mmcross.model import Matcher

FORMAT, FORMAT_VERSION = "mmcross.matcher", "1"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


@dataclass
class PresetInfo:
    name: str  # preset name, e.g. "tiny"
    encoder: str  # open_clip architecture
    embed_dim: int  # size of the dual-encoder embedding
    params: int  # parameters of the whole matcher: both encoders, fusion block and match head
    description: str


def list_models() -> list[PresetInfo]:
    """The architecture presets with their encoder, embedding size and parameter count."""
    infos = []
    for name in list_presets():
        cfg = load_matcher_cfg(name)
        with torch.device("meta"):  # shapes only: no memory, no init
            matcher = _assemble(cfg, load_encoders(dataclasses.replace(cfg.encoder, pretrained=None), device="meta"))
        infos.append(
            PresetInfo(
                name=name,
                encoder=cfg.encoder.model_name,
                embed_dim=matcher.image_encoder.embed_dim,
                params=sum(p.numel() for p in matcher.parameters()),
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


def create_matcher(
    name_or_cfg: str | MatcherCfg,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
) -> Matcher:
    """Build a matcher from a preset name, a JSON config file or a `MatcherCfg`.

    Encoders come from open_clip (seeded random init or `pretrained` weights); the fusion block and head are
    initialised from `cfg.fusion.seed`, so the same config gives the same model in every process.
    """
    if isinstance(name_or_cfg, MatcherCfg):
        cfg = apply_overrides(name_or_cfg, overrides or {})
        if pretrained is not None:
            cfg = apply_overrides(cfg, {"encoder.pretrained": pretrained})
    else:
        cfg = resolve_cfg(name_or_cfg, pretrained, overrides)
    _refuse_mmcross_pretrained(cfg.encoder.pretrained)
    return _assemble(cfg, load_encoders(cfg.encoder, device=device)).to(device).eval()


def _assemble(cfg: MatcherCfg, encoders: Encoders) -> Matcher:
    """Encoders + a fusion block and head initialised from `cfg.fusion.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.fusion.seed)
        fusion = build_fusion(cfg.fusion, encoders.image.token_dim, encoders.text.token_dim)
        head = MatchHead(cfg.fusion.dim, from_itc=cfg.fusion.head_from_itc)
    return Matcher(encoders.image, encoders.text, fusion, head, cfg)


def architecture(cfg: MatcherCfg) -> dict[str, Any]:
    """What fixes a matcher's tensors: the open_clip architecture and the fusion shape (not seeds, not weights)."""
    fusion = {k: v for k, v in to_dict(cfg.fusion).items() if k not in ("seed", "dropout", "head_from_itc")}
    return {"encoder": cfg.encoder.model_name, "token_stage": cfg.encoder.token_stage, "fusion": fusion}


def describe(cfg: MatcherCfg) -> str:
    """One line naming an architecture, for error messages."""
    f = cfg.fusion
    return (
        f"{cfg.name} ({cfg.encoder.model_name}"
        + (f" tokens from stage {cfg.encoder.token_stage}" if cfg.encoder.token_stage else "")
        + f", fusion {f.variant} dim {f.dim}, {f.self_layers} self + "
        f"{f.cross_layers} cross layers, {f.heads}x{f.dim_head} heads, {f.score_rule} scores)"
    )


def save_checkpoint(matcher: Matcher, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `matcher` as a self-describing safetensors checkpoint; `metadata` adds string entries (e.g. step)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_checkpoint_file(matcher, tmp, metadata)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint under the real name
    return path


def write_checkpoint_file(matcher: Matcher, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The checkpoint bytes of `matcher` at exactly `path` (no rename; `save_checkpoint` is the atomic write).

    Besides the config, the metadata records whether the fusion and head were trained: `head_trained` ("true" /
    "false") and `head_steps` (optimiser steps with ITM gradients), both left out when unknown.
    """
    from safetensors.torch import save_file

    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(to_dict(matcher.cfg)),
    }
    if matcher.head_steps is not None:
        meta["head_trained"] = "true" if matcher.head_steps > 0 else "false"
        meta["head_steps"] = str(matcher.head_steps)
    meta["mmcross_version"] = __version__
    state = {k: v.detach().contiguous().cpu() for k, v in matcher.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def _safetensors_header(path: Path) -> tuple[dict | None, bytes]:
    """(the JSON header of a safetensors file, None when it is not one; the file's first 8 bytes), read by hand."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    try:
        parsed = json.loads(header) if header.startswith(b"{") else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    return (parsed if isinstance(parsed, dict) else None), head


def _refuse_mmcross_pretrained(pretrained: str | None) -> None:
    """Refuse a mmcross checkpoint passed as open_clip weights (open_clip would list every tensor as missing)."""
    path = Path(pretrained).expanduser() if pretrained else None
    if path is None or not path.is_file():
        return
    parsed, _ = _safetensors_header(path)
    if parsed is not None and (parsed.get("__metadata__") or {}).get("format") == FORMAT:
        raise ValueError(
            f"--pretrained {pretrained} is an mmcross checkpoint (encoders, fusion and head), not open_clip weights; "
            f"use --checkpoint {pretrained} (embed, index, search, score, explain, eval); `mmcross train` starts from "
            "open_clip weights and continues its own runs with --resume"
        )


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, after checking its header by hand; never unpickles anything."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    hint = (
        "mmcross checkpoints are .safetensors files written by mmcross; open_clip pretrained weights go to "
        "--pretrained, where open_clip loads them with weights_only=True"
    )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"refusing {path}: a {path.suffix} file may be a pickle, which mmcross never loads; {hint}")
    parsed, head = _safetensors_header(path)
    if parsed is None:
        kind = "no safetensors file (its header does not parse: truncated, damaged or another format)"
        if head[:1] == b"\x80":
            kind = "a pickle"
        elif head[:2] == b"PK":
            kind = "a zip archive (torch.save format, pickle inside)"
        raise ValueError(f"refusing {path}: it is {kind}, and mmcross never unpickles; {hint}")
    meta = parsed.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"refusing {path}: a safetensors file without mmcross metadata; {hint}")
    return meta


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a mmcross checkpoint (config, step, head_steps, ...), read without loading any tensor."""
    return _safetensors_metadata(Path(path))


def load_checkpoint(
    path: str | Path, expected: str | MatcherCfg | None = None, device: str | torch.device = "cpu"
) -> Matcher:
    """Rebuild a matcher from a checkpoint alone (see the module docstring for the format).

    Args:
        path: a `.safetensors` file written by `save_checkpoint`.
        expected: a preset name, config file or `MatcherCfg` the checkpoint must match in architecture; None = any.
        device: where to put the model.

    Raises:
        ValueError: not a mmcross safetensors checkpoint (pickles are refused unread), another architecture than
            `expected`, or tensors that do not fit the architecture its config names.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    meta = _safetensors_metadata(path)
    cfg = from_dict(MatcherCfg, json.loads(meta["config"]))
    if expected is not None:
        want = expected if isinstance(expected, MatcherCfg) else load_matcher_cfg(expected)
        if architecture(want) != architecture(cfg):
            raise ValueError(f"checkpoint {path} holds {describe(cfg)}, not the expected {describe(want)}")
    # The weights come from the file: build the architecture with random init, never fetch pretrained weights.
    matcher = create_matcher(apply_overrides(cfg, {"encoder.pretrained": None}), device=device)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as err:  # a header that parses over a truncated or damaged body
        raise ValueError(f"checkpoint {path} is damaged or truncated ({err})") from None
    want_shapes = {k: tuple(v.shape) for k, v in matcher.state_dict().items()}
    if shapes != want_shapes:
        wrong = sorted(set(shapes) ^ set(want_shapes)) + sorted(
            k for k in shapes.keys() & want_shapes.keys() if shapes[k] != want_shapes[k]
        )
        raise ValueError(
            f"checkpoint {path} says it holds {describe(cfg)}, but its tensors do not fit that architecture "
            f"({len(wrong)} keys missing, extra or of another shape, e.g. {', '.join(wrong[:3])})"
        )
    matcher.load_state_dict(tensors)
    matcher.cfg = cfg  # keep the provenance (encoder.pretrained) the checkpoint recorded
    matcher.head_steps = checkpoint_head_steps(meta)
    return matcher


def checkpoint_head_steps(meta: dict[str, str]) -> int | None:
    """The training steps of the fusion and head a checkpoint's metadata records.

    None for a checkpoint written before mmcross recorded them (no `head_steps` key): such checkpoints came from
    training runs, which trained the head unless `itm_weight` was 0, so they are treated as trained and old runs
    keep re-ranking as before.
    """
    return int(meta["head_steps"]) if "head_steps" in meta else None


BEST_CHECKPOINT = "best.safetensors"  # what a run directory's `--checkpoint RUN_DIR` means
LAST_CHECKPOINT = "last.safetensors"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a training run directory (its best checkpoint, else its last)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run directory {path} holds no {BEST_CHECKPOINT} or {LAST_CHECKPOINT}")
    return path


def load_matcher(ref: ModelRef, device: str | torch.device = "cpu", inference: InferenceCfg | None = None) -> Matcher:
    """The matcher a model reference names: its checkpoint, else its resolved config, else its preset (or config
    file) with `pretrained` and `overrides`; its encoders run as `inference` says (`mmcross.fast`; None: torch fp32).

    With a checkpoint, which holds its architecture and weights, what would otherwise be ignored is refused, naming
    both sides: a `model` of another architecture, and overrides other than `CHECKPOINT_SETTABLE`.
    """
    if ref.checkpoint is not None:
        matcher = _load_checkpoint_ref(ref, device)
    elif ref.config is not None:
        matcher = create_matcher(from_dict(MatcherCfg, ref.config), ref.pretrained, device, ref.overrides)
    else:
        model = ref.model or DEFAULT_MODEL
        matcher = create_matcher(model, pretrained=ref.pretrained, device=device, overrides=ref.overrides)
    if inference is not None:
        from mmcross.fast import use_inference

        use_inference(matcher, inference, ref)
    return matcher


def graph_folders(ref: ModelRef, matcher: Matcher, fingerprint: str | None = None) -> list[Path]:
    """Where `mmcross.fast` looks for a matcher's exported graphs, in order; the last is where it builds them.

    Beside the weights file (`best.safetensors` -> `best.graphs/`; a local `--pretrained` file likewise), else
    under `$MMCROSS_CACHE/graphs` (default `~/.cache/mmcross/graphs`) in a folder per preset and towers'
    `fingerprint` (`towers_fingerprint`, computed when not given). A `.graphs` folder that cannot be written (a
    shared run folder) is read first, and new graphs go to the cache.
    """
    import os

    weights = resolve_checkpoint(ref.checkpoint) if ref.checkpoint else None
    pretrained = matcher.cfg.encoder.pretrained
    if weights is None and pretrained and Path(pretrained).expanduser().is_file():
        weights = Path(pretrained).expanduser()
    beside = weights.with_name(weights.stem + ".graphs") if weights is not None else None
    if beside is not None and os.access(beside if beside.exists() else beside.parent, os.W_OK):
        return [beside]
    root = Path(os.environ.get("MMCROSS_CACHE") or Path.home() / ".cache" / "mmcross")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in matcher.cfg.name)
    fingerprint = fingerprint or towers_fingerprint(matcher)
    cache = root / "graphs" / f"{name}-{fingerprint.removeprefix('sha256:')}"
    return [beside, cache] if beside is not None and beside.is_dir() else [cache]


def graph_cache_dir(ref: ModelRef, matcher: Matcher, fingerprint: str | None = None) -> Path:
    """The folder `mmcross.fast` builds a matcher's graphs in (`graph_folders`' last)."""
    return graph_folders(ref, matcher, fingerprint)[-1]


# What `--set` may change on a checkpoint: its weights come from the file, so seeds, pretrained weights, precision and
# initialisation choices would be silently ignored; only how the ranking score weighs ITC still applies.
CHECKPOINT_SETTABLE = ("itc_weight",)


def _load_checkpoint_ref(ref: ModelRef, device: str | torch.device) -> Matcher:
    """The matcher of a reference naming a checkpoint, after checking `ref.model` and `ref.overrides` against it."""
    if ref.pretrained is not None:
        raise ValueError("give either --checkpoint or --pretrained, not both")
    path = resolve_checkpoint(ref.checkpoint)
    matcher = load_checkpoint(path, device=device)
    if ref.model is not None and ref.config is None:  # a stored reference (`config` set) names its checkpoint's own
        want = load_matcher_cfg(ref.model, ref.overrides)
        if architecture(want) != architecture(matcher.cfg):
            raise ValueError(
                f"--model {ref.model}{' with --set' if ref.overrides else ''} is {describe(want)}, but checkpoint "
                f"{path} holds {describe(matcher.cfg)}; "
                "drop --model (a checkpoint holds its own architecture)"
            )
        have = apply_overrides(matcher.cfg, ref.overrides or {}).itc_weight
        if want.itc_weight != have:  # the one setting a checkpoint takes from outside: never dropped in silence
            raise ValueError(
                f"--model {ref.model} ranks by itm + {want.itc_weight:g} x itc, checkpoint {path} by itm + "
                f"{have:g} x itc; drop --model, or choose with --set itc_weight=..."
            )
    if ref.overrides:
        cfg = apply_overrides(matcher.cfg, ref.overrides)
        given = f"--set {', '.join(f'{k}={v}' for k, v in ref.overrides.items())}"
        if architecture(cfg) != architecture(matcher.cfg):
            raise ValueError(f"{given} would make {describe(cfg)}, but checkpoint {path} holds {describe(matcher.cfg)}")
        ignored = [k for k in _changed_fields(matcher.cfg, cfg) if k not in CHECKPOINT_SETTABLE]
        if ignored:
            raise ValueError(
                f"{given} cannot change checkpoint {path}: its weights come from the file, so {', '.join(ignored)} "
                f"would be ignored; only {', '.join(CHECKPOINT_SETTABLE)} can be set on a checkpoint"
            )
        matcher.cfg = cfg
    return matcher


def _changed_fields(a: MatcherCfg, b: MatcherCfg) -> list[str]:
    """Dotted names of the fields whose values differ between two configs."""

    fa, fb = flatten_dotted(to_dict(a)), flatten_dotted(to_dict(b))
    return [k for k in fa if fa[k] != fb.get(k)]


def pinned(ref: ModelRef, matcher: Matcher) -> ModelRef:
    """`ref` as a manifest stores it: the checkpoint (and a local `pretrained` file) as an absolute path, the built
    matcher's config filled in (so the reference rebuilds the same model wherever it is read and whatever became of a
    config file)."""
    checkpoint = str(resolve_checkpoint(ref.checkpoint).resolve()) if ref.checkpoint else None
    config = to_dict(matcher.cfg)
    weights = config["encoder"].get("pretrained")
    if weights and Path(weights).expanduser().is_file():
        config["encoder"]["pretrained"] = str(Path(weights).expanduser().resolve())
    return dataclasses.replace(ref, checkpoint=checkpoint, config=config, pretrained=None)


def reference_name(ref: ModelRef) -> str:
    """How messages name the model of `ref`: its checkpoint, else its preset (and weights)."""
    if ref.checkpoint:
        return str(ref.checkpoint)
    name = ref.config["name"] if ref.config else ref.model or DEFAULT_MODEL
    pretrained = ref.config["encoder"]["pretrained"] if ref.config else ref.pretrained
    return name + (f" ({pretrained})" if pretrained else "")


def towers_fingerprint(matcher: Matcher) -> str:
    """A hash of the two towers' weights alone: what `mmcross.fast`'s graphs are made of (the fusion and head never
    enter them, so another fusion on the same towers reuses the same graphs)."""
    return model_fingerprint(torch.nn.ModuleDict({"image": matcher.image_encoder, "text": matcher.text_encoder}))


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's weights (every state-dict tensor, by name): equal weights give equal fingerprints."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]
