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
    MatcherCfg,
    ModelRef,
    apply_overrides,
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
    return {"encoder": cfg.encoder.model_name, "fusion": fusion}


def describe(cfg: MatcherCfg) -> str:
    """One line naming an architecture, for error messages."""
    f = cfg.fusion
    return (
        f"{cfg.name} ({cfg.encoder.model_name}, fusion {f.variant} dim {f.dim}, {f.self_layers} self + "
        f"{f.cross_layers} cross layers, {f.heads}x{f.dim_head} heads, {f.score_rule} scores)"
    )


def save_checkpoint(matcher: Matcher, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `matcher` as a self-describing safetensors checkpoint; `metadata` adds string entries (e.g. step)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name}")
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(to_dict(matcher.cfg)),
    }
    meta["mmcross_version"] = __version__
    state = {k: v.detach().contiguous().cpu() for k, v in matcher.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint under the real name
    return path


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
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    try:
        parsed = json.loads(header) if header.startswith(b"{") else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        kind = "not safetensors"
        if head[:1] == b"\x80":
            kind = "a pickle"
        elif head[:2] == b"PK":
            kind = "a zip archive (torch.save format, pickle inside)"
        raise ValueError(f"refusing {path}: it is {kind}, and mmcross never unpickles; {hint}")
    meta = parsed.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"refusing {path}: a safetensors file without mmcross metadata; {hint}")
    return meta


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
    from safetensors import safe_open
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
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want_shapes = {k: tuple(v.shape) for k, v in matcher.state_dict().items()}
    if shapes != want_shapes:
        wrong = sorted(set(shapes) ^ set(want_shapes)) + sorted(
            k for k in shapes.keys() & want_shapes.keys() if shapes[k] != want_shapes[k]
        )
        raise ValueError(
            f"checkpoint {path} says it holds {describe(cfg)}, but its tensors do not fit that architecture "
            f"({len(wrong)} keys missing, extra or of another shape, e.g. {', '.join(wrong[:3])})"
        )
    matcher.load_state_dict(load_file(str(path), device=str(device)))
    matcher.cfg = cfg  # keep the provenance (encoder.pretrained) the checkpoint recorded
    return matcher


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


def load_matcher(ref: ModelRef, device: str | torch.device = "cpu") -> Matcher:
    """The matcher a model reference names: its checkpoint, else its resolved config, else its preset (or config
    file) with `pretrained` and `overrides`.

    With a checkpoint, overrides may change what does not change the weights' shapes (e.g. `itc_weight`); one that
    changes the architecture is refused, naming both.
    """
    if ref.checkpoint is not None:
        if ref.pretrained is not None:
            raise ValueError("give either --checkpoint or --pretrained, not both")
        matcher = load_checkpoint(resolve_checkpoint(ref.checkpoint), device=device)
        if ref.overrides:
            cfg = apply_overrides(matcher.cfg, ref.overrides)
            if architecture(cfg) != architecture(matcher.cfg):
                raise ValueError(
                    f"--set {', '.join(f'{k}={v}' for k, v in ref.overrides.items())} would make {describe(cfg)}, "
                    f"but checkpoint {ref.checkpoint} holds {describe(matcher.cfg)}"
                )
            matcher.cfg = cfg
        return matcher
    if ref.config is not None:
        return create_matcher(from_dict(MatcherCfg, ref.config), ref.pretrained, device, ref.overrides)
    return create_matcher(ref.model, pretrained=ref.pretrained, device=device, overrides=ref.overrides)


def pinned(ref: ModelRef, matcher: Matcher) -> ModelRef:
    """`ref` as a manifest stores it: the checkpoint as an absolute path, the built matcher's config filled in (so the
    reference rebuilds the same model wherever it is read and whatever became of a config file)."""
    checkpoint = str(resolve_checkpoint(ref.checkpoint).resolve()) if ref.checkpoint else None
    return dataclasses.replace(ref, checkpoint=checkpoint, config=to_dict(matcher.cfg), pretrained=None)


def reference_name(ref: ModelRef) -> str:
    """How messages name the model of `ref`: its checkpoint, else its preset (and weights)."""
    if ref.checkpoint:
        return str(ref.checkpoint)
    name = ref.config["name"] if ref.config else ref.model
    pretrained = ref.config["encoder"]["pretrained"] if ref.config else ref.pretrained
    return name + (f" ({pretrained})" if pretrained else "")


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's weights (every state-dict tensor, by name): equal weights give equal fingerprints."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]
