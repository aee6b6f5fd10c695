"""open_clip encoders: pooled embeddings plus the token states the fusion head needs.

This is the only module that imports open_clip. It exposes:

- `ImageEncoder`: pixels (B, 3, H, W) -> `ImageFeatures(pooled (B, E), tokens (B, P, Dv))`.
- `TextEncoder`: token ids (B, C) -> `TextFeatures(pooled (B, E), tokens (B, L, Dt), mask (B, L))`, each batch cut
  to its longest caption instead of the fixed context C (77 for CLIP). With a causal text tower and EOT pooling,
  no real position attends to padding, so the cut changes nothing but the cost (`mmcross.encode` batches captions
  by length, so most batches are short).

`pooled` is the towers' raw projection here (as open_clip's `encode_image` / `encode_text` give it); the matcher
normalises it.
- `load_encoders(EncoderCfg)`: builds both from an open_clip architecture with seeded random init or pretrained
  weights (tag, local file, `hf-hub:` id), failing fast and clearly when the weights cannot be fetched.
- `token_strings(tokenizer, ids)`: the word pieces of token ids, for labels (attention heat maps).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from safetensors import SafetensorError
from torch import nn

from mmcross.config import PRESET_DIR, EncoderCfg
from mmcross.features import ImageFeatures, TextFeatures

HF_HOST = "huggingface.co"
PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16")  # open_clip's `precision`
LENGTH_CHUNK = 64  # captions per text-tower call when a large batch is split by length
CONNECT_TIMEOUT_S = 3.0
_OPEN_CLIP_CONFIG_DIR = PRESET_DIR / "open_clip"


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline, unknown tag, missing file)."""


def list_architectures() -> list[str]:
    """open_clip architecture names, including mmcross's own (e.g. `mmcross-tiny`)."""
    _register_configs()
    return open_clip.list_models()


def _register_configs() -> None:
    if "mmcross-tiny" not in open_clip.list_models():
        open_clip.add_model_config(_OPEN_CLIP_CONFIG_DIR)


class ImageEncoder(nn.Module):
    """Wraps an open_clip vision tower so it returns its pooled embedding and its patch tokens."""

    def __init__(
        self,
        visual: nn.Module,
        embed_dim: int,
        preprocess: Callable | None = None,
        preprocess_train: Callable | None = None,
        token_stage: int | None = None,
    ):
        super().__init__()
        self.visual = visual
        self.token_stage = token_stage  # ModifiedResNet stage (1-4) the patch tokens come from; None = the last
        self.preprocess = preprocess  # PIL image -> (3, H, W) tensor, evaluation transform
        self.preprocess_train = preprocess_train  # the same with open_clip's training augmentation
        if isinstance(visual, VisionTransformer):
            visual.output_tokens = True
            # CoCa-style towers return attention-pooled query tokens instead of patch tokens.
            self.token_dim = (
                visual.attn_pool.query.shape[-1] if visual.attn_pool is not None else visual.transformer.width
            )
        elif isinstance(visual, ModifiedResNet):
            self.token_dim = visual.attnpool.k_proj.in_features
            if token_stage is not None:
                if token_stage not in (1, 2, 3, 4):
                    raise ValueError(f"encoder.token_stage is a ModifiedResNet stage 1-4, not {token_stage}")
                self.token_dim = getattr(visual, f"layer{token_stage}")[-1].bn3.num_features
            # oneDNN's convolutions run ~1.5x faster on CPU in NHWC (measured: ModifiedResNet [1,2,2,1] x32 at
            # 96 px, forward + backward of 128 images, 1.52 s -> 1.01 s on 2 cores); values are unchanged
            visual.to(memory_format=torch.channels_last)
        elif isinstance(visual, TimmModel):
            self.token_dim = visual.trunk.num_features
        else:
            raise NotImplementedError(f"mmcross cannot take patch tokens from a {type(visual).__name__} vision tower")
        if token_stage is not None and not isinstance(visual, ModifiedResNet):
            raise ValueError("encoder.token_stage applies to ModifiedResNet conv towers only")
        self.embed_dim = embed_dim
        # a compiled graph of this tower (`mmcross.fast`): pixels -> (pooled, tokens); None runs the torch modules
        self.runtime: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        size = visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tower takes pixels in: its first convolution's (open_clip's fp16/bf16 towers keep some
        parameters, norms and embeddings, in fp32)."""
        conv = next((m for m in self.visual.modules() if isinstance(m, nn.Conv2d)), None)
        return conv.weight.dtype if conv is not None else next(self.visual.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> ImageFeatures:
        if self.runtime is not None:
            pooled, tokens = self.runtime(pixels)
            return ImageFeatures(pooled=pooled, tokens=tokens)
        visual = self.visual
        pixels = pixels.to(self.dtype)  # a tower built at `encoder.precision` fp16/bf16 takes pixels of its dtype
        if isinstance(visual, VisionTransformer):
            pooled, tokens = visual(pixels)  # (B, E), (B, P, Dv)
        elif isinstance(visual, ModifiedResNet):
            x = visual.stem(pixels.contiguous(memory_format=torch.channels_last))
            token_map = None
            for stage, layer in enumerate((visual.layer1, visual.layer2, visual.layer3, visual.layer4), start=1):
                x = layer(x)  # (B, C_stage, h_stage, w_stage)
                if stage == self.token_stage:
                    token_map = x
            tokens = (x if token_map is None else token_map).flatten(2).transpose(1, 2)  # (B, h*w, Dv)
            pooled = visual.attnpool(x)
        else:
            features = visual.trunk.forward_features(pixels)
            pooled = visual.head(visual.trunk.forward_head(features))
            if features.ndim == 4:  # convnet feature map (B, Dv, h, w)
                tokens = features.flatten(2).transpose(1, 2)
            else:  # (B, prefix + P, Dv)
                tokens = features[:, getattr(visual.trunk, "num_prefix_tokens", 0) :]
        return ImageFeatures(pooled=pooled, tokens=tokens)


class TextEncoder(nn.Module):
    """Wraps an open_clip text tower so it returns pooled embedding, token states and padding mask."""

    def __init__(self, model: nn.Module, tokenizer: Callable):
        super().__init__()
        self.tokenizer = tokenizer
        tower = getattr(model, "text", None)
        if isinstance(tower, HFTextEncoder):
            self.tower = tower
            tower.output_tokens = True
            self.pad_id = tower.config.pad_token_id
            self.token_dim = tower.transformer.config.hidden_size
            self.context_length = tokenizer.context_length
            self.embed_dim = tower.output_dim
            self.cuttable = True  # HF towers mask padding themselves
            return
        if isinstance(tower, TextTransformer) and (tower.cls_emb is not None or tower.use_pad_mask):
            # CoCa-style or padding-masked towers build their own masks: run them as they are, uncut.
            self.tower = tower
            tower.output_tokens = True
            self.pool_type, self.eos_id, self.pad_id = tower.pool_type, tower.eos_id, tower.pad_id
            self.token_dim = tower.width
            self.context_length = tower.context_length
            self.embed_dim = tower.output_dim
            self.cuttable = False
            return
        # CLIP keeps its text tower's parts on the model itself; CustomTextCLIP keeps them on `model.text`.
        src = tower if tower is not None else model
        self.tower = None
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)
        self.pool_type = src.pool_type if tower is not None else src.text_pool_type
        self.eos_id = src.eos_id if tower is not None else src.text_eos_id
        self.pad_id = getattr(src, "pad_id", 0)
        self.token_dim = self.transformer.width
        self.context_length = self.positional_embedding.shape[0]
        self.embed_dim = (
            self.text_projection.out_features
            if isinstance(self.text_projection, nn.Linear)
            else (self.text_projection.shape[1] if self.text_projection is not None else self.token_dim)
        )
        # Cutting is exact only when padding sits after the pooled position and nothing attends forward to it.
        self.cuttable = self.attn_mask is not None and self.pool_type in ("argmax", "eos")

    # a compiled graph of `core` (`mmcross.fast`): ids (B, L), already cut -> (pooled, states); None runs torch
    runtime: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids (N, C); captions longer than the context are truncated as open_clip does."""
        return self.tokenizer(captions)

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C) token ids -> (B, C) bool, True at real tokens."""
        if self.tower is None and self.pool_type in ("argmax", "eos"):
            if self.pool_type == "argmax":
                end = tokens.argmax(dim=-1)  # (B,) the end token has the largest id
            else:
                end = (tokens == self.eos_id).int().argmax(dim=-1)  # (B,)
            return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= end[:, None]
        return tokens != self.pad_id

    def forward(self, tokens: torch.Tensor) -> TextFeatures:
        mask = self.padding_mask(tokens)  # (B, C)
        if self.cuttable and tokens.shape[0] >= 2 * LENGTH_CHUNK:
            # a training batch mixes short and long captions: run it in chunks of similar length, each cut to its
            # own longest caption (exact: no real position sees padding), instead of padding all to the longest
            order = mask.sum(dim=1).argsort()  # (B,) shortest first
            parts = [self._forward(tokens[rows], mask[rows]) for rows in order.split(LENGTH_CHUNK)]
            return TextFeatures.cat(parts).select(order.argsort())  # back in row order
        return self._forward(tokens, mask)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        if self.cuttable:
            length = int(mask.sum(dim=1).max())
            tokens, mask = tokens[:, :length], mask[:, :length]  # (B, L)
        if self.tower is not None:
            pooled, states = self.tower(tokens)
            if states.shape[1] != mask.shape[1]:  # an HF CLS pooler drops the CLS position from its tokens
                mask = mask[:, 1:]
            return TextFeatures(pooled=pooled, tokens=states, mask=mask)

        if self.runtime is not None:
            pooled, states = self.runtime(tokens)
            return TextFeatures(pooled=pooled, tokens=states, mask=mask)
        pooled, x = self.core(tokens)
        return TextFeatures(pooled=pooled, tokens=x, mask=mask)

    def core(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids, cut -> pooled (B, E), token states (B, L, Dt); what `mmcross.fast` exports (open_clip
        CLIP-style towers only)."""
        length = tokens.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)  # (B, L, Dt)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)  # (B, L, Dt)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":
            pooled = x[rows, tokens.argmax(dim=-1)]  # (B, Dt)
        elif self.pool_type == "eos":
            pooled = x[rows, (tokens == self.eos_id).int().argmax(dim=-1)]
        elif self.pool_type == "first":
            pooled = x[:, 0]
        elif self.pool_type == "last":
            pooled = x[:, -1]
        else:
            pooled = x
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)  # (B, E)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return pooled, x


@dataclass
class Encoders:
    image: ImageEncoder
    text: TextEncoder
    model_name: str  # the open_clip architecture actually built
    pretrained: str | None  # what the weights came from, None for seeded random init


def _hub_reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _go_offline_if_unreachable(host: str) -> None:
    """Honour HF_HUB_OFFLINE; set it ourselves when the host cannot be reached, so nothing retries for minutes."""
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        hf_constants.HF_HUB_OFFLINE = True
        return
    if not _hub_reachable(host):
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub, so set it there too


def _unavailable(what: str, err: Exception | str) -> PretrainedUnavailable:
    import huggingface_hub.constants as hf_constants

    if isinstance(err, Exception) and hf_constants.HF_HUB_OFFLINE:
        reason = "offline (HF_HUB_OFFLINE=1) and not in the local cache"
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    return PretrainedUnavailable(
        f"cannot load pretrained weights {what}: {reason}. Download the open_clip checkpoint on a machine that "
        "can reach it and pass the file: --pretrained /path/to/open_clip_model.safetensors (to train: "
        "`pretrained:` in the run config, or --set pretrained=/path/to/open_clip_model.safetensors)"
    )


def _resolve_pretrained(model_name: str, pretrained: str) -> tuple[str, str]:
    """Make sure the weights are on disk; returns (open_clip model name, open_clip `pretrained` argument)."""
    if pretrained.startswith("hf-hub:"):
        _go_offline_if_unreachable(HF_HOST)
        try:
            open_clip.pretrained.download_pretrained_from_hf(pretrained.removeprefix("hf-hub:"))
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not available"
            raise _unavailable(f"{pretrained} (from {HF_HOST})", err) from err
        return pretrained, ""
    if Path(pretrained).expanduser().is_file():
        return model_name, str(Path(pretrained).expanduser())
    if Path(pretrained).expanduser().is_dir():
        raise PretrainedUnavailable(
            f"--pretrained {pretrained} is a folder; a mmcross training run goes to --checkpoint, open_clip weights "
            "to --pretrained as the file itself"
        )
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise PretrainedUnavailable(
            f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of {model_name}; "
            f"tags: {', '.join(tags) or 'none'}"
        )
    source = f"hf-hub:{tag_cfg['hf_hub']}" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
    host = HF_HOST if tag_cfg.get("hf_hub") else urlparse(source).hostname or HF_HOST
    _go_offline_if_unreachable(HF_HOST)
    if not tag_cfg.get("hf_hub") and not _hub_reachable(host):
        raise _unavailable(f"{model_name}/{pretrained} (from {source})", f"{host} is unreachable")
    try:
        open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # noqa: BLE001
        raise _unavailable(f"{model_name}/{pretrained} (from {source})", err) from err
    return model_name, pretrained


def _unpickling_reason(err: Exception) -> str:
    """One line for a weights file torch refused to unpickle (its message spans a paragraph)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
    return (
        f"it holds Python objects besides tensors, which could run code when unpickled, so it was not loaded ({why}); "
        "use open_clip weights saved as tensors (.safetensors, or a torch state dict)"
    )


def _build_error(model_name: str, pretrained: str | None, err: Exception) -> str:
    """One line for open_clip failing to build a model; a weights file of another model lists every tensor, so
    only the counts and a first name are kept."""
    text = str(err)
    if "Error(s) in loading state_dict" not in text:
        return f"cannot build open_clip model {model_name}: {text}"
    counts = {}
    for kind in ("Missing key(s)", "Unexpected key(s)"):
        line = next((x for x in text.splitlines() if x.strip().startswith(kind)), "")
        counts[kind] = re.findall(r'"([^"]+)"', line)
    shapes = text.count("size mismatch for")
    missing, unexpected = counts["Missing key(s)"], counts["Unexpected key(s)"]
    example = (missing or unexpected or [""])[0]
    return (
        f"--pretrained {pretrained} does not hold {model_name} weights: {len(missing)} tensors missing, "
        f"{len(unexpected)} unexpected, {shapes} of another shape" + (f" (e.g. {example})" if example else "")
    )


def load_encoders(cfg: EncoderCfg, device: str | torch.device = "cpu") -> Encoders:
    """Build the image and text encoders of `cfg`: seeded random init, or the pretrained weights it names."""
    _register_configs()
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"encoder.precision {cfg.precision!r}: one of {', '.join(PRECISIONS)}")
    model_name, pretrained = cfg.model_name, ""
    if cfg.pretrained:
        model_name, pretrained = _resolve_pretrained(cfg.model_name, cfg.pretrained)
    elif cfg.model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {cfg.model_name!r}; see open_clip.list_models()")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same preset gives the same weights in every process
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained or None,
                precision=cfg.precision,
                device=device,
                pretrained_text=False,  # never fetch base text weights behind the user's back
                weights_only=True,
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused it before running anything
        raise ValueError(f"refusing --pretrained {cfg.pretrained}: {_unpickling_reason(err)}") from None
    except SafetensorError as err:  # a truncated or damaged .safetensors file
        raise ValueError(f"--pretrained {cfg.pretrained} is not a readable safetensors file: {err}") from None
    except AssertionError as err:  # open_clip's checks while loading weights of another model (pos_embed widths)
        if not cfg.pretrained:
            raise
        raise ValueError(f"--pretrained {cfg.pretrained} does not hold {model_name} weights ({err})") from None
    except (RuntimeError, OSError, ImportError) as err:  # e.g. a tower that needs `transformers`, a bad file
        raise ValueError(_build_error(model_name, cfg.pretrained, err)) from None
    model.eval()
    text = TextEncoder(model, tokenizer)
    return Encoders(
        image=ImageEncoder(model.visual, text.embed_dim, preprocess, preprocess_train, cfg.token_stage),
        text=text,
        model_name=model_name,
        pretrained=cfg.pretrained,
    )


def build_open_clip_reference(cfg: EncoderCfg, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """The plain open_clip model and tokenizer for `cfg` (same seed, same weights), for equality tests and benches."""
    _register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(cfg.model_name, precision=cfg.precision, device=device, pretrained_text=False)
    return model.eval(), open_clip.get_tokenizer(cfg.model_name)


def architecture_summary(model_name: str) -> dict[str, int]:
    """Embedding size and parameter counts of an open_clip architecture, without allocating its weights."""
    _register_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}")
    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta", pretrained_text=False)
    visual = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"embed_dim": int(config["embed_dim"]), "image_params": visual, "text_params": total - visual}


def architecture_config(model_name: str) -> dict:
    """open_clip's JSON config of an architecture (for manifests and fingerprints)."""
    _register_configs()
    return json.loads(json.dumps(open_clip.get_model_config(model_name)))


def count_tokens(model_name: str, captions: list[str]) -> tuple[list[int], int]:
    """Untruncated token counts (start and end tokens included) of captions with `model_name`'s open_clip
    tokenizer, and that tokenizer's context length; no model is built. Captions longer than the context are the
    ones open_clip truncates."""
    _register_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}")
    return token_counts(open_clip.get_tokenizer(model_name), captions)


def token_counts(tokenizer: Callable, captions: list[str]) -> tuple[list[int], int]:
    """`count_tokens` with a tokenizer at hand (a built model's `text_encoder.tokenizer`)."""
    context = int(tokenizer.context_length)
    if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        return [len(tokenizer.encode(caption)) + 2 for caption in captions], context
    clean = getattr(tokenizer, "clean_fn", lambda text: text)
    ids = tokenizer.tokenizer([clean(caption) for caption in captions])["input_ids"]  # Hugging Face tokenizers
    return [len(row) for row in ids], context


def longer_than_context(tokenizer: Callable, captions: list[str]) -> tuple[int, int]:
    """(how many of `captions` `tokenizer` cuts to fit its context, that context length)."""
    counts, context = token_counts(tokenizer, captions)
    return sum(count > context for count in counts), context


def token_strings(tokenizer: Callable, ids: Sequence[int]) -> list[str]:
    """The word piece each token id stands for, for display (attention heat maps label their panels with them).

    Special tokens keep their names (`<start_of_text>`, `<end_of_text>`, `[CLS]`); BPE end-of-word marks are dropped.
    Works with open_clip's `SimpleTokenizer` and its Hugging Face tokenizer wrapper; other tokenizers give the ids.
    """
    ids = [int(i) for i in ids]
    if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        out = []
        for i in ids:
            piece = tokenizer.decoder.get(i, f"<{i}>")
            if piece.startswith("<") and piece.endswith(">") and "_of_text" in piece:
                out.append(piece)
                continue
            raw = bytearray(tokenizer.byte_decoder.get(c, ord("?")) for c in piece.replace("</w>", ""))
            out.append(raw.decode("utf-8", errors="replace"))
        return out
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
        return [str(piece) for piece in inner.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]
