"""`fit()`: fine-tune a matcher with ITC + ITM (hard negatives) [+ VSE++], and the run directory it writes.

A run directory holds:

    config.json          the resolved `RunCfg` (after YAML and `--set`)
    log.jsonl            one line per `log_every` steps: step, epoch, loss and each term, lr, temperature,
                         samples/s, elapsed seconds; and one line per dev evaluation ({"step", "eval": {...}})
    last.safetensors     the matcher at the latest checkpoint (`mmcross.factory` format, `step` in its metadata)
    best.safetensors     the matcher with the best dev rsum (re-ranked when `eval_rerank_k` > 0)
    state.safetensors    optimiser tensors, the ITC temperature and RNG states (no pickle anywhere)
    state.json           step, optimiser param groups, scheduler state, best score, matching last.safetensors

Determinism and resume: batch b of epoch e is a fixed function of (seed, e, b) (a seeded permutation, one seeded
caption per image, a per-image augmentation seed), and the global RNG (dropout, hard-negative sampling) is reseeded
from (seed, step, rank) at every optimiser step. So a run resumed from its last checkpoint (`resume=True`) takes
exactly the steps the uninterrupted run would have, and on CPU its loss curve matches it.

Distributed: under `torchrun` (WORLD_SIZE > 1) the process group is opened (gloo on CPU, NCCL on CUDA), each rank
takes its slice of every global batch, the model is wrapped in DDP, and the ITC loss gathers embeddings from all
ranks with gradients (`mmcross.losses.gather_with_grad`). Rank 0 writes the log, checkpoints and evaluations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmcross.config import DataCfg, RunCfg, TrainCfg, to_dict
from mmcross.data.decoded import DecodedImages, augment_batch, default_cache_dir
from mmcross.data.loader import collate, load_item
from mmcross.data.records import Record, RejectLog, caption_key
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.losses import LossWeights, MatchingLoss, world
from mmcross.model import Matcher

log = logging.getLogger(__name__)

STATE_TENSORS, STATE_JSON, LOG_FILE, CONFIG_FILE = "state.safetensors", "state.json", "log.jsonl", "config.json"
TRAINABLE = ("fusion", "last_n", "all")


@dataclass
class FitResult:
    """What `fit` did."""

    run_dir: Path
    step: int  # optimiser steps done
    seconds: float  # wall time of this call
    best: float | None  # best dev rsum seen (re-ranked when evaluated with re-ranking)
    eval: dict[str, Any] | None  # the last dev evaluation (`mmcross.evaluate.evaluate` output)
    losses: list[dict[str, float]]  # every step's log entry from this call
    matcher: Matcher | None = None  # the trained model (this process's copy)
    stopped_by: str = "max_steps"  # "max_steps": the whole budget ran; "max_minutes": the safety stop fired first


# ---- what trains ---------------------------------------------------------------------------------------------------


def _blocks(encoder: nn.Module) -> nn.ModuleList | None:
    """The transformer block list of an encoder tower (open_clip `resblocks`, timm `blocks`, HF `layer`)."""
    for name in ("resblocks", "blocks", "layer", "layers"):
        for mod_name, module in encoder.named_modules():
            if mod_name.split(".")[-1] == name and isinstance(module, nn.ModuleList):
                return module
    return None


HEAD_PARTS = ("ln_post", "proj", "ln_final", "text_projection", "attn_pool", "head", "final_layer_norm", "pooler")


def set_trainable(matcher: Matcher, mode: str, last_n: int = 2) -> None:
    """Choose what trains: "fusion" (encoders frozen), "last_n" (+ the last `last_n` blocks of each tower and what
    follows them: final norm, projection) or "all"."""
    if mode not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {', '.join(TRAINABLE)}, got {mode!r}")
    matcher.freeze_encoders(mode == "fusion")
    if mode != "last_n":
        return
    for encoder in (matcher.image_encoder, matcher.text_encoder):
        encoder.requires_grad_(False)
        blocks = _blocks(encoder)
        if blocks is None:
            raise ValueError(f"cannot find the transformer blocks of {type(encoder).__name__} for trainable=last_n")
        for block in list(blocks)[-last_n:] if last_n > 0 else []:
            block.requires_grad_(True)
        for name, param in encoder.named_parameters():
            if any(part in name.split(".") for part in HEAD_PARTS):
                param.requires_grad_(True)


# ---- data ----------------------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class EpochPlan:
    """Which images and captions micro-batch m holds: a fixed function of (seed, epoch, position), so resumable.

    An epoch shows every caption of every image once: it is R rounds (R = the most captions any image has), each a
    fresh permutation of the images, and in round r image i carries its caption (o_i + r) mod n_i, o_i a random
    offset drawn per epoch. So the images of one micro-batch are distinct (captions of one image are never one
    another's negatives), and an image with fewer captions than R repeats some of them. A round drops the last
    `n_images mod global batch` images of its permutation.

    Args:
        n_images: images in the training set.
        caption_counts: captions per image.
        batch: images per micro-batch per rank.
        world_size: ranks; a global micro-batch holds `batch * world_size` distinct images.
        seed: the run's seed.
    """

    def __init__(self, n_images: int, caption_counts: Sequence[int], batch: int, world_size: int, seed: int):
        self.n, self.batch, self.world_size, self.seed = n_images, batch, world_size, seed
        self.counts = torch.tensor(list(caption_counts)).clamp_min(1)
        self.rounds = int(self.counts.max()) if n_images else 1
        self.per_round = n_images // (batch * world_size)
        if self.per_round < 1:
            raise ValueError(f"{n_images} training images are fewer than one global batch ({batch * world_size})")
        self.per_epoch = self.rounds * self.per_round
        self._cached: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def _draw(self, what: str, key: tuple[int, ...], make) -> torch.Tensor:
        cached = self._cached.get(what)
        if cached is None or cached[0] != key:
            cached = self._cached[what] = (key, make(torch.Generator().manual_seed(_mix(self.seed, *key))))
        return cached[1]

    def micro_batch(self, m: int, rank: int) -> tuple[int, list[int], list[int]]:
        """(epoch, image indices, caption index per image) of global micro-batch `m` for `rank`."""
        epoch, within = divmod(m, self.per_epoch)
        round_, position = divmod(within, self.per_round)
        offset = self._draw("offset", (epoch, 1), lambda g: torch.randint(0, 1 << 30, (self.n,), generator=g))
        perm = self._draw("perm", (epoch, round_, 5), lambda g: torch.randperm(self.n, generator=g))
        start = position * self.batch * self.world_size + rank * self.batch
        images = perm[start : start + self.batch]
        return epoch, images.tolist(), ((offset[images] + round_) % self.counts[images]).tolist()


class PlannedImages(torch.utils.data.Dataset):
    """Micro-batches `first, first + 1, ...` of an `EpochPlan` for one rank, decoded (in DataLoader workers)."""

    def __init__(
        self,
        records: Sequence[Record],
        plan: EpochPlan,
        first: int,
        count: int,
        rank: int,
        transform,
        cfg: DataCfg,
        draft_size: tuple[int, int] | None = None,
    ):
        self.records, self.plan, self.first, self.count, self.rank = records, plan, first, count, rank
        self.transform, self.cfg = transform, cfg
        self.draft_size = draft_size  # (W, H): JPEGs decode at the smallest DCT scale at least this large

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int):
        epoch, images, captions = self.plan.micro_batch(self.first + b, self.rank)
        items = []
        for image in images:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.plan.seed, epoch, image, 2))  # augmentation of this image this epoch
                items.append(load_item(image, self.records[image], self.transform, self.cfg, self.draft_size))
        return collate(items), dict(zip(images, captions))


# ---- the trained module --------------------------------------------------------------------------------------------


class TrainModule(nn.Module):
    """Matcher + losses in one module, so DDP sees every forward and every parameter (the temperature included)."""

    def __init__(self, matcher: Matcher, loss: MatchingLoss):
        super().__init__()
        self.matcher, self.loss = matcher, loss

    def forward(
        self,
        pixels: torch.Tensor | None,
        ids: torch.Tensor | None,
        image: ImageFeatures | None = None,
        text: TextFeatures | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        known: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch; `pairs` = (image rows, caption token ids, labels): extra labelled ITM pairs; `known`
        (B, B): True where caption j is one of image i's captions too (not a negative)."""
        image = image if image is not None else self.matcher.encode_image(pixels)
        text = text if text is not None else self.matcher.encode_text(ids)
        pair_text = None
        if pairs is not None and len(pairs[0]):
            pair_text = (pairs[0], self.matcher.encode_text(pairs[1]), pairs[2])  # (rows, captions, labels)
        return self.loss(self.matcher, image, text, pair_text, known)


def param_groups(module: TrainModule, cfg: TrainCfg) -> list[dict[str, Any]]:
    """AdamW groups: {fusion/head/temperature, encoders} x {decay, no decay (biases, norms, embeddings, scale)}."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_encoder = name.startswith(("matcher.image_encoder.", "matcher.text_encoder."))
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        groups.setdefault((is_encoder, no_decay), []).append(param)
    out = []
    for (is_encoder, no_decay), params in sorted(groups.items()):
        lr = cfg.encoder_lr if is_encoder and cfg.encoder_lr is not None else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return out


def lr_factor(step: int, cfg: TrainCfg) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- state without pickle --------------------------------------------------------------------------------------------


def save_state(run_dir: Path, optimizer, scheduler, loss: MatchingLoss, info: dict[str, Any]) -> None:
    """Optimiser tensors, temperature and RNG state to state.safetensors; everything else to state.json."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"loss.logit_scale": loss.itc.logit_scale.detach().cpu().clone()}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(pid), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc = {**info, "param_groups": opt["param_groups"], "optim_plain_state": plain_state, "scheduler": sched}
    tmp_t, tmp_j = run_dir / (STATE_TENSORS + ".tmp"), run_dir / (STATE_JSON + ".tmp")
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(doc, indent=1))
    tmp_t.replace(run_dir / STATE_TENSORS)
    tmp_j.replace(run_dir / STATE_JSON)


def load_state(run_dir: Path, optimizer, scheduler, loss: MatchingLoss, device) -> dict[str, Any]:
    """Restore what `save_state` wrote; returns state.json's content."""
    from safetensors.torch import load_file

    doc = json.loads((run_dir / STATE_JSON).read_text())
    tensors = load_file(str(run_dir / STATE_TENSORS))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value.to(device)
    for pid, entries in doc["optim_plain_state"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    scheduler.load_state_dict({**doc["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    with torch.no_grad():
        loss.itc.logit_scale.copy_(tensors["loss.logit_scale"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return doc


# ---- fit -----------------------------------------------------------------------------------------------------------


def _setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_name == "auto" else device_name.startswith("cuda")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = world()
    if cuda:
        device = torch.device(
            f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            if size > 1
            else ("cuda" if device_name == "auto" else device_name)
        )
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, size, device


def _read_records(path: str, fmt: str, split: str | None) -> list[Record]:
    from mmcross.data.registry import open_dataset

    records = [r for r in open_dataset(path, DataCfg(format=fmt, split=split)).records() if r.captions]
    if not records:
        raise ValueError(f"{path} has no images with captions in split {split!r}")
    return records


@dataclass
class _FeatureCache:
    images: ImageFeatures  # encoder outputs of every training image (eval transform)
    texts: TextFeatures  # every caption
    first_caption: torch.Tensor  # (N,) index in `texts` of each image's first caption
    captions: list[str]  # the captions of `texts`, in order
    good: torch.Tensor  # (N,) bool, image decoded


def _build_feature_cache(matcher: Matcher, records: Sequence[Record], cfg: TrainCfg) -> _FeatureCache:
    from mmcross.encode import encode_records, encode_texts

    try:
        encoded = encode_records(matcher, records, batch_size=cfg.batch_size, workers=cfg.workers)
    except ValueError:
        raise ValueError("no training image could be decoded") from None
    good = torch.zeros(len(records), dtype=torch.bool)
    good[encoded.indices] = True
    pooled = encoded.features.pooled.new_zeros(len(records), *encoded.features.pooled.shape[1:])
    tokens = encoded.features.tokens.new_zeros(len(records), *encoded.features.tokens.shape[1:])
    pooled[good], tokens[good] = encoded.features.pooled, encoded.features.tokens
    device = matcher.device
    captions = [c for r in records for c in r.captions]
    texts = encode_texts(matcher, captions, batch_size=4 * cfg.batch_size).to(device)
    counts = torch.tensor([len(r.captions) for r in records])
    first = torch.cumsum(counts, 0) - counts
    return _FeatureCache(ImageFeatures(pooled, tokens).to(device), texts, first, captions, good)


def known_matches(
    records: Sequence[Record], captions: Sequence[str], also_true: dict[str, list[str]] | None = None
) -> torch.Tensor:
    """(B, B) bool: caption j (the one drawn for image j) is also true of image i: image j is image i (the same file
    under two records), the caption is one of image i's own captions, or one of the other captions
    `also_true[image_id]` lists as true of image i (a synth manifest's `statements`).

    Captions compare by `caption_key` (case, spacing, final period ignored). Such pairs are no negatives in the losses.
    """
    also_true = also_true or {}
    own = [{caption_key(c) for c in [*record.captions, *also_true.get(record.image_id, ())]} for record in records]
    drawn = [caption_key(c) for c in captions]
    where = [record.where for record in records]
    return torch.tensor(
        [[caption in mine or where[j] == where[i] for j, caption in enumerate(drawn)] for i, mine in enumerate(own)],
        dtype=torch.bool,
    )


def _raw_text(texts: TextFeatures, index: torch.Tensor) -> TextFeatures:
    return texts.select(index)


def _normalisation(transform) -> tuple[list[float], list[float]]:
    """(mean, std) of the `Normalize` step of an image transform (open_clip's preprocess)."""
    from torchvision.transforms import Normalize

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, Normalize):
            return list(step.mean), list(step.std)
    raise ValueError("the image transform has no Normalize step")


def _streaming_transform(matcher: Matcher, cfg: TrainCfg):
    """The PIL transform of the streaming path: open_clip's training transform with `augment_min_scale`."""
    from torchvision.transforms import Compose, RandomResizedCrop

    encoder = matcher.image_encoder
    if not cfg.augment or encoder.preprocess_train is None:
        return encoder.preprocess
    steps = list(getattr(encoder.preprocess_train, "transforms", []))
    if steps and isinstance(steps[0], RandomResizedCrop):
        first = steps[0]
        steps[0] = RandomResizedCrop(
            first.size, scale=(cfg.augment_min_scale, 1.0), ratio=first.ratio, interpolation=first.interpolation
        )
        return Compose(steps)
    return encoder.preprocess_train


def _decode_cache(
    matcher: Matcher, records: Sequence[Record], cfg: TrainCfg, rank: int, size: int
) -> DecodedImages | None:
    """The decoded training images (built by rank 0 on first use), or None to stream (cache off or too large)."""
    if cfg.decode_cache.lower() in ("none", "off", "") or cfg.feature_cache:
        return None
    h, w = matcher.image_encoder.image_size
    side = max(h, w) if not cfg.augment else math.ceil(max(h, w) * 1.15 / 8) * 8  # a margin for the crops
    if DecodedImages.nbytes(len(records), side) > cfg.decode_cache_max_gb * 2**30:
        log.warning(
            "the decoded training set would take %.1f GB > train.decode_cache_max_gb=%s; streaming from the files",
            DecodedImages.nbytes(len(records), side) / 2**30,
            cfg.decode_cache_max_gb,
        )
        return None
    folder = default_cache_dir() if cfg.decode_cache.lower() == "auto" else Path(cfg.decode_cache)
    kwargs = dict(dataset=cfg.data, split=cfg.split, cfg=DataCfg(format=cfg.format), workers=os.cpu_count() or 1)
    if size > 1 and rank != 0:
        dist.barrier()  # rank 0 builds it
    started = time.perf_counter()
    decoded = DecodedImages.open_or_build(records, side, folder, **kwargs)
    if size > 1 and rank == 0:
        dist.barrier()
    if decoded.built:
        log.info(
            "decoded %d training images at %d px in %.1f s -> %s",
            len(records),
            side,
            time.perf_counter() - started,
            decoded.folder,
        )
    return decoded


def _dataset_pairs(matcher: Matcher, records: Sequence[Record], captions: Sequence[str], negative_of):
    """Every caption of each image that has a swapped negative, and that negative, as labelled ITM pairs: the
    binding signal, which the one drawn caption per image would give a third as often (one encoded image, 2n pairs).
    """
    labelled = [
        (row, text, label)
        for row, (r, drawn) in enumerate(zip(records, captions))
        for caption, negative in negative_of.get(r.image_id, {}).items()
        for text, label in ((caption, 1.0), (negative, 0.0))
        if text != drawn  # the drawn caption is already the ITM's positive
    ]
    if not labelled:
        return None
    rows, texts, labels = zip(*labelled)
    return torch.tensor(rows), matcher.tokenize(list(texts)), torch.tensor(labels)


def fit(
    run: RunCfg,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train the matcher `run` describes and write the run directory (see the module docstring).

    Args:
        run: model, weights, architecture overrides and `TrainCfg`.
        run_dir: output folder; `mmcross eval --checkpoint RUN_DIR` then loads its best (else last) checkpoint.
        resume: continue from `run_dir`'s last checkpoint (the same config is expected; steps already done are kept).
        progress: show a progress bar on stderr (rank 0).
        on_step: called with each step's log entry (tests use it to stop a run).

    Returns:
        A `FitResult`.
    """
    from mmcross.evaluate import evaluate
    from mmcross.factory import LAST_CHECKPOINT, create_matcher, load_checkpoint, save_checkpoint

    cfg = run.train
    if not cfg.data:
        raise ValueError("no training data: set train.data in the run config or --set train.data=PATH")
    if cfg.feature_cache and cfg.trainable != "fusion":
        raise ValueError("train.feature_cache needs train.trainable=fusion (frozen encoders)")
    if cfg.batch_size < 2:
        raise ValueError("train.batch_size must be at least 2 (in-batch negatives)")
    if not 0.0 <= cfg.itm_uniform_negatives <= 1.0:
        raise ValueError(f"train.itm_uniform_negatives is a share in [0, 1], not {cfg.itm_uniform_negatives}")
    if cfg.dataset_negatives and cfg.feature_cache:
        raise ValueError("train.dataset_negatives is not supported with train.feature_cache")
    negative_of: dict[str, dict[str, str]] = {}
    also_true: dict[str, list[str]] = {}
    if cfg.dataset_negatives:
        from mmcross.data.synth import read_negatives, read_statements

        negative_of = read_negatives(cfg.data)
        # every true caption of each scene, so another image's "a red circle left of a blue square" is not drawn as a
        # negative of a scene where it holds too (the ITC sampler prefers exactly such same-object scenes)
        also_true = read_statements(cfg.data)
    start_time = time.perf_counter()
    rank, size, device = _setup_distributed(cfg.device)
    run_dir = Path(run_dir)
    is_main = rank == 0
    last_path = run_dir / LAST_CHECKPOINT
    if resume and not (last_path.is_file() and (run_dir / STATE_JSON).is_file()):
        raise FileNotFoundError(f"nothing to resume in {run_dir}: no {LAST_CHECKPOINT} with {STATE_JSON}")
    if not resume and is_main and (last_path.exists() or (run_dir / LOG_FILE).exists()):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(to_dict(run), indent=2) + "\n")

    torch.manual_seed(_mix(cfg.seed, 0, rank))
    if resume:
        matcher = load_checkpoint(last_path, device=device)
    else:
        matcher = create_matcher(run.model, pretrained=run.pretrained, device=device, overrides=run.matcher)
    set_trainable(matcher, cfg.trainable, cfg.last_n_blocks)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    records = _read_records(cfg.data, cfg.format, cfg.split)
    eval_records: list[Record] = []
    if cfg.eval_split and is_main:
        eval_records = _read_records(cfg.eval_data or cfg.data, cfg.format, cfg.eval_split)[: cfg.eval_max_images]

    weights = LossWeights(cfg.itc_weight, cfg.itm_weight, cfg.vse_weight, cfg.vse_margin, cfg.itm_uniform_negatives)
    loss_module = MatchingLoss(weights, cfg.init_temperature).to(device)
    module = TrainModule(matcher, loss_module)
    model: nn.Module = module
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=not (cfg.itc_weight and cfg.itm_weight),
        )
    # fused: one kernel for all parameters; the for-loop default spends ~15% of a tiny-model step on CPU
    optimizer = torch.optim.AdamW(param_groups(module, cfg), betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    step, best = 0, None
    if resume:
        doc = load_state(run_dir, optimizer, scheduler, loss_module, device)
        step, best = doc["step"], doc.get("best")
        _truncate_log(run_dir / LOG_FILE, step)

    cache = _build_feature_cache(matcher, records, cfg) if cfg.feature_cache else None
    decoded = _decode_cache(matcher, records, cfg, rank, size)
    decoded_rows = None
    if decoded is not None:
        if is_main and decoded.rejects:
            RejectLog(run_dir).write(decoded.rejects)
        decoded_rows = np.flatnonzero(decoded.ok)  # training records are the images that decoded
        records = [records[i] for i in decoded_rows]
        if not records:
            raise ValueError(f"none of the training images of {cfg.data} could be decoded (see rejects.jsonl)")
        mean, std = _normalisation(matcher.image_encoder.preprocess)
    plan = EpochPlan(len(records), [len(r.captions) for r in records], cfg.batch_size, size, cfg.seed)
    transform = _streaming_transform(matcher, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext

    def micro_batches(first: int):
        """Yield (pixels or image feats, ids or text feats, n) for global micro-batches first, first + 1, ..."""
        if cache is not None:
            m = first
            while True:
                _, images, captions = plan.micro_batch(m, rank)
                idx = torch.tensor(images)
                idx = idx[cache.good[idx]]
                cap = cache.first_caption[idx] + torch.tensor(
                    [captions[images.index(i)] for i in idx.tolist()], dtype=torch.long
                )
                dev = cache.images.pooled.device
                rows = [records[i] for i in idx.tolist()]
                drawn = [cache.captions[c] for c in cap.tolist()]
                yield (
                    ImageFeatures(cache.images.pooled[idx.to(dev)], cache.images.tokens[idx.to(dev)]),
                    _raw_text(cache.texts, cap),
                    len(idx),
                    None,
                    known_matches(rows, drawn, also_true).to(dev),
                )
                m += 1
        h, w = matcher.image_encoder.image_size
        if decoded is not None:
            m = first
            while True:
                _, images, caption_idx = plan.micro_batch(m, rank)
                generator = torch.Generator().manual_seed(_mix(cfg.seed, m, rank, 4))  # this micro-batch's crops
                pixels = augment_batch(
                    decoded.batch(decoded_rows[images]),
                    (h, w),
                    mean,
                    std,
                    min_scale=cfg.augment_min_scale if cfg.augment else None,
                    generator=generator,
                )
                rows = [records[i] for i in images]
                captions = [r.captions[c] for r, c in zip(rows, caption_idx)]
                pairs = _dataset_pairs(matcher, rows, captions, negative_of) if negative_of else None
                yield pixels, matcher.tokenize(captions), len(captions), pairs, known_matches(rows, captions, also_true)
                m += 1
        total = (cfg.max_steps - step) * cfg.accum_steps
        dataset = PlannedImages(records, plan, first, total, rank, transform, DataCfg(format=cfg.format), (w, h))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
        )
        for batch, caption_of in loader:
            if batch.pixels is None:
                yield None, None, 0, None, None
                continue
            captions = [r.captions[caption_of[i]] for i, r in zip(batch.indices, batch.records)]
            pairs = _dataset_pairs(matcher, batch.records, captions, negative_of) if negative_of else None
            yield (
                batch.pixels,
                matcher.tokenize(captions),
                len(captions),
                pairs,
                known_matches(batch.records, captions, also_true),
            )

    bar = _progress(progress and is_main, cfg.max_steps, step)
    batches = micro_batches(step * cfg.accum_steps)
    losses: list[dict[str, float]] = []
    last_eval = None
    log_file = (run_dir / LOG_FILE).open("a") if is_main else None
    window_samples, window_start = 0, time.perf_counter()
    stopped_by = "max_steps"
    module.train()
    try:
        while step < cfg.max_steps:
            torch.manual_seed(_mix(cfg.seed, step, rank, 3))  # dropout and hard negatives of this step
            sums: dict[str, float] = {}
            for a in range(cfg.accum_steps):
                first, second, n, pairs, known = next(batches)
                if n < 2:
                    log.warning("skipping a micro-batch with %d usable images", n)
                    continue
                sync = size == 1 or a == cfg.accum_steps - 1
                with nullcontext() if sync else model.no_sync(), autocast():
                    if cache is not None:
                        out = model(None, None, first, second, known=known)
                    else:
                        out = model(first, second, pairs=pairs, known=known)
                (out["loss"] / cfg.accum_steps).backward()
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / cfg.accum_steps
                window_samples += n * size
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            entry = {
                "step": step,
                "epoch": round(step * cfg.accum_steps / plan.per_epoch, 4),
                **{k: round(v, 6) for k, v in sums.items()},
                "lr": lr,
                "temperature": round(float(1 / loss_module.itc.scale().detach()), 6),
                "samples_per_s": round(window_samples / max(now - window_start, 1e-9), 2),
                "elapsed_s": round(now - start_time, 2),
            }
            losses.append(entry)
            bar(step, entry)
            if log_file and (step % max(cfg.log_every, 1) == 0 or step == cfg.max_steps):
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                window_samples, window_start = 0, time.perf_counter()
            out_of_time = cfg.max_minutes > 0 and (now - start_time) / 60 >= cfg.max_minutes
            out_of_time = _all_agree(out_of_time, device)
            final = step == cfg.max_steps or out_of_time
            if eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
                last_eval = evaluate(
                    matcher, eval_records, cfg.eval_rerank_k, batch_size=cfg.batch_size, workers=cfg.workers
                )
                key = "rerank_metrics" if last_eval["rerank_metrics"] else "metrics"
                score = last_eval[key]["rsum"]
                if best is None or score > best:
                    best = score
                    save_checkpoint(matcher, run_dir / "best.safetensors", {"step": str(step), "rsum": str(score)})
                log_file.write(json.dumps({"step": step, "eval": last_eval}) + "\n")
                log_file.flush()
                module.train()
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or final:
                if is_main:
                    save_checkpoint(matcher, last_path, {"step": str(step)})
                    save_state(run_dir, optimizer, scheduler, loss_module, {"step": step, "best": best})
                if size > 1:
                    dist.barrier()
            if on_step is not None:
                on_step(entry)
            if out_of_time:
                stopped_by = "max_minutes"
                log.warning("stopping at step %d: train.max_minutes=%s reached", step, cfg.max_minutes)
                break
        if log_file:
            # what the run promised (max_steps) and what it did: a safety stop is never silent
            done = {"step": step, "stopped_by": stopped_by, "max_steps": cfg.max_steps}
            log_file.write(json.dumps({**done, "elapsed_s": round(time.perf_counter() - start_time, 2)}) + "\n")
    finally:
        if log_file:
            log_file.close()
        bar(None, None)
    return FitResult(run_dir, step, time.perf_counter() - start_time, best, last_eval, losses, matcher, stopped_by)


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True when any rank says True (all ranks stop together)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a run killed between checkpoints)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _progress(enabled: bool, total: int, done: int):
    """A rich progress bar on stderr; returns update(step, entry), and update(None, None) to close."""
    if not enabled:
        return lambda step, entry: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(file=sys.stderr),
    )
    task = bar.add_task("train", total=total, completed=done, info="")
    bar.start()

    def update(step, entry):
        if step is None:
            bar.stop()
            return
        bar.update(task, completed=step, info=f"loss {entry['loss']:.4f} lr {entry['lr']:.2e}")

    return update


def train_from_config(
    config: str | Path | None,
    run_dir: str | Path,
    overrides: dict[str, str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """`mmcross train`: defaults < YAML run config < `--set` overrides, then `fit`."""
    from mmcross.config import load_run_cfg

    run = load_run_cfg(config, overrides)
    if resume:
        saved = Path(run_dir) / CONFIG_FILE
        if saved.is_file() and config is None and not overrides:
            from mmcross.config import from_dict

            data = json.loads(saved.read_text())
            run = from_dict(RunCfg, {**data, "train": TrainCfg(**data["train"])})
    return fit(run, run_dir, resume=resume, progress=progress)


__all__ = ["FitResult", "fit", "set_trainable", "train_from_config"]
