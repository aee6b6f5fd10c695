"""`fit`: the training loop, and the pieces it is made of (run set-up, one optimiser step, evaluate + checkpoint)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmcross.config import RunCfg, TrainCfg, to_dict, train_data_cfg
from mmcross.data.records import NothingReadable, Record, Reject, RejectLog, normalise_split
from mmcross.dist import DEVICE, any_rank, setup_training, world
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.losses import LossWeights, MatchingLoss
from mmcross.model import Matcher
from mmcross.progress import Progress
from mmcross.train.fusion_phase import enter_fusion_phase
from mmcross.train.optim import optimizer_and_schedule, set_trainable
from mmcross.train.plan import NEIGHBOUR_POOL, BatchSource, MicroBatch, mix_seed
from mmcross.train.state import (
    CONFIG_FILE,
    LOG_FILE,
    STATE_JSON,
    load_state,
    nothing_to_resume,
    read_run_cfg,
    recover,
    resume_config,
    save_checkpoint_and_state,
    truncate_log,
)

log = logging.getLogger(__name__)


def tell(message: str) -> None:
    """A note the user must see (the CLI shows library logs only with --verbose): stderr, and the log."""
    log.warning(message)
    print(f"note: {message}", file=sys.stderr, flush=True)


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
    loss_curve: Path | None = None  # loss.png in the run directory (`train_from_config`, rank 0)
    rejects: int = 0  # training (and dev) images and caption rows that could not be used (RUN_DIR/rejects.jsonl)
    resumed_with: dict[str, list] = field(default_factory=dict)  # train fields --set changed on resume: [was, now]


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
        image_rows: torch.Tensor | None = None,
        itm: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch; `pairs` = (image rows, caption token ids, labels): extra labelled ITM pairs; `known`
        (B, B): True where caption j is one of image i's captions too (not a negative); `image_rows` (B,): which
        image of `pixels` each caption row belongs to (None: one image per row); `itm` False: no ITM this batch."""
        image = image if image is not None else self.matcher.encode_image(pixels)
        itm_rows = None
        if image_rows is not None:
            image = image.select(image_rows)  # (B, ...) one row per caption; the tower ran once per image
            # the ITM takes each image's first row: one caption per image, as many fusion pairs as images
            rows = torch.arange(len(image_rows), device=image_rows.device)
            first = torch.full((int(image_rows.max()) + 1,), len(rows), device=rows.device)
            itm_rows = first.scatter_reduce(0, image_rows, rows, "amin")  # (I,)
        text = text if text is not None else self.matcher.encode_text(ids)
        pair_text = None
        if pairs is not None and len(pairs[0]):
            pair_text = (pairs[0], self.matcher.encode_text(pairs[1]), pairs[2])  # (rows, captions, labels)
        return self.loss(self.matcher, image, text, pair_text, known, itm_rows, itm)


def read_records(path: str, cfg: TrainCfg, split: str | None, option: str = "train.split") -> tuple[list[Record], list]:
    """(records with captions, the reader's rejects: empty captions, malformed rows) of one split of `path`, read
    as `cfg` says (format, image root, table columns)."""
    from mmcross.data.registry import open_dataset

    ds = open_dataset(path, train_data_cfg(cfg, split))
    records = [r for r in ds.records() if r.captions]
    if not records:
        raise ValueError(ds.nothing_in_split(option))
    return records, ds.stats.rejects


# numeric settings with a floor, checked by `check_cfg` before anything is built (not a traceback after the run)
MIN_VALUES = {
    "max_steps": 1,
    "accum_steps": 1,
    "warmup_steps": 0,
    "eval_every": 0,
    "ckpt_every": 0,
    "log_every": 0,
    "eval_rerank_k": 0,
    "eval_max_images": 1,
    "last_n_blocks": 0,
    "fusion_steps": 0,
    "fusion_batch_size": 2,
    "fusion_warmup_steps": 0,
    "neighbour_batches": 0,
}
NON_NEGATIVE = (
    "encoder_lr",
    "weight_decay",
    "grad_clip",
    "max_minutes",
    "itc_weight",
    "itm_weight",
    "vse_weight",
    "itm_rank_weight",
    "vse_margin",
    "decode_cache_max_gb",
)
POSITIVE = ("lr", "fusion_lr", "init_temperature")  # a step size; the temperature divides (its log is learned)


AUTOCAST = ("auto", "bf16", "off")


def autocast_context(setting: str, device: torch.device):
    """The mixed-precision context of one training forward (`train.autocast`); the backward follows it. A fresh
    context per micro-batch: the CPU one cannot be entered twice."""
    if device.type == "cuda" and setting != "off":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and setting == "bf16" and cpu_has_bf16():
        # and attention by its plain matrix products: the fused CPU kernel (flash attention) chosen by default is
        # slow backwards in bf16 at these small shapes (a 4x4 grid, ~20 caption tokens): measured on the config's
        # step, 65 % of the ITM's forward + backward went to it; without it the config's ITC steps ran 1.06x and its
        # ITC + ITM steps 1.4x faster (in fp32 the two paths cost the same). The forward picks the kernel; its
        # backward follows it.
        return _cpu_bf16()
    return nullcontext()


@contextmanager
def _cpu_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


@functools.cache  # asked once per process, not at every step
def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere CPU bf16 is emulated, and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_cfg(cfg: TrainCfg) -> None:
    """Refuse settings that cannot go together, before anything is built."""
    if not cfg.data:
        raise ValueError("no training data: set train.data in the run config or --set train.data=PATH")
    for key in ("split", "eval_split"):  # eval_split None (none) means no evaluation; `all` is every record
        try:
            normalise_split(getattr(cfg, key))
        except ValueError as err:
            raise ValueError(f"train.{key}: {err}") from None
    if cfg.feature_cache and cfg.trainable != "fusion":
        raise ValueError("train.feature_cache needs train.trainable=fusion (frozen encoders)")
    if cfg.batch_size < 2:
        raise ValueError("train.batch_size must be at least 2 (in-batch negatives)")
    if cfg.captions_per_image < 1 or cfg.batch_size % cfg.captions_per_image:
        raise ValueError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of train.captions_per_image "
            f"({cfg.captions_per_image}, at least 1)"
        )
    if not 0.0 <= cfg.itm_uniform_negatives <= 1.0:
        raise ValueError(f"train.itm_uniform_negatives is a share in [0, 1], not {cfg.itm_uniform_negatives}")
    if not (0.0 <= cfg.itm_start < 1.0 or (cfg.itm_start == 1.0 and cfg.fusion_steps > 0)):
        raise ValueError(
            f"train.itm_start is a share of train.max_steps in [0, 1) (1.0 with train.fusion_steps: the ITM only in "
            f"the fusion phase), not {cfg.itm_start}"
        )
    if cfg.fusion_steps and cfg.dataset_negatives:
        raise ValueError("train.dataset_negatives is not supported with train.fusion_steps (a feature-cache phase)")
    if cfg.fusion_steps and not cfg.itm_weight > 0:
        raise ValueError("train.fusion_steps trains the fusion by the ITM alone: it needs train.itm_weight > 0")
    if cfg.neighbour_batches > 0 and not (cfg.feature_cache or cfg.fusion_steps):
        raise ValueError(
            "train.neighbour_batches builds batches from the feature cache: it needs train.fusion_steps "
            "or train.feature_cache"
        )
    if not 0.0 <= cfg.paraphrase_cosine <= 1.0:
        raise ValueError(f"train.paraphrase_cosine is a cosine in [0, 1] (0 = off), not {cfg.paraphrase_cosine}")
    if not 0.0 <= cfg.paraphrase_share < 1.0:
        raise ValueError(f"train.paraphrase_share is a share of pairs in [0, 1) (0 = off), not {cfg.paraphrase_share}")
    if cfg.paraphrase_cosine > 0 and cfg.paraphrase_share > 0:
        raise ValueError("give train.paraphrase_cosine or train.paraphrase_share, not both (the share sets the cosine)")
    for name in ("paraphrase_cosine", "paraphrase_share"):
        if getattr(cfg, name) > 0 and not (cfg.feature_cache or cfg.fusion_steps):
            raise ValueError(
                f"train.{name} compares captions' embeddings in the feature cache: it needs "
                "train.fusion_steps or train.feature_cache"
            )
    if cfg.neighbour_batches > NEIGHBOUR_POOL:
        raise ValueError(
            f"train.neighbour_batches draws from each image's {NEIGHBOUR_POOL} nearest: at most "
            f"{NEIGHBOUR_POOL}, not {cfg.neighbour_batches}"
        )
    batch_key = "fusion_batch_size" if cfg.fusion_steps else "batch_size"  # the batch the neighbourhoods fill
    if cfg.neighbour_batches > 0 and getattr(cfg, batch_key) % (cfg.neighbour_batches + 1):
        raise ValueError(
            f"train.{batch_key} ({getattr(cfg, batch_key)}) must be a multiple of "
            f"train.neighbour_batches + 1 ({cfg.neighbour_batches + 1}: an image and its neighbours)"
        )
    if cfg.autocast not in AUTOCAST:
        raise ValueError(f"train.autocast is one of {', '.join(AUTOCAST)}, not {cfg.autocast!r}")
    if not 0.0 <= cfg.caption_word_drop < 1.0:
        raise ValueError(f"train.caption_word_drop is a probability in [0, 1), not {cfg.caption_word_drop}")
    if cfg.dataset_negatives and cfg.feature_cache:
        raise ValueError("train.dataset_negatives is not supported with train.feature_cache")
    if cfg.dataset_negatives and cfg.captions_per_image > 1:
        raise ValueError("train.dataset_negatives needs train.captions_per_image=1")
    for name, low in MIN_VALUES.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"train.{name} must be at least {low}, got {getattr(cfg, name)}")
    for f in dataclasses.fields(cfg):  # inf and NaN reach the first step (a NaN loss, an inf learning rate)
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"train.{f.name} must be a finite number, got {value}")
    for name in POSITIVE:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"train.{name} must be positive, got {value}")
    for name in NON_NEGATIVE:
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            raise ValueError(f"train.{name} must be 0 or more, got {value}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            f"train.min_lr_ratio is a fraction of the peak learning rate in [0, 1], not {cfg.min_lr_ratio}"
        )
    if not (cfg.itc_weight or cfg.vse_weight or (cfg.itm_weight and cfg.itm_start == 0)):
        # the ITM is the only term, and off before itm_start: those steps would have nothing to backpropagate
        raise ValueError(
            f"train.itc_weight ({cfg.itc_weight}), itm_weight ({cfg.itm_weight}) and vse_weight ({cfg.vse_weight}) "
            f"with itm_start {cfg.itm_start} leave steps without any loss term: give ITC or VSE a weight"
        )
    if not DEVICE.fullmatch(cfg.device):
        raise ValueError(f"train.device is auto, cpu, cuda or cuda:N, not {cfg.device!r}")


def dataset_negatives(cfg: TrainCfg) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """(image_id -> {caption: its hard negative}, image_id -> every caption true of it) for
    `train.dataset_negatives` (a synth manifest), else two empty maps."""
    if not cfg.dataset_negatives:
        return {}, {}
    from mmcross.data.synth import read_negatives, read_statements

    # every true caption of each scene, so another image's "a red circle left of a blue square" is not drawn as a
    # negative of a scene where it holds too (the ITC sampler prefers exactly such same-object scenes)
    return read_negatives(cfg.data), read_statements(cfg.data)


@dataclass
class Run:
    """Everything a training run holds while it runs."""

    cfg: TrainCfg
    run_dir: Path
    rank: int
    size: int
    device: torch.device
    matcher: Matcher
    loss: MatchingLoss
    module: TrainModule  # matcher + loss
    model: nn.Module  # `module`, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_time: float
    step: int = 0
    best: float | None = None
    last_eval: dict[str, Any] | None = None
    losses: list[dict[str, float]] = field(default_factory=list)
    head_learns: bool = False  # the steps train the match head (ITM loss on, head trainable): counted in head_steps
    phase_start: int = 0  # the step the current phase started at (the towers' `max_steps` in the fusion phase)
    reject_log: RejectLog | None = None  # rank 0's rejects.jsonl: training and dev images it could not use
    resumed_with: dict[str, list] = field(default_factory=dict)  # train fields --set changed on resume: [was, now]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_run(run: RunCfg, run_dir: Path, resume: bool, deliberate: Collection[str] = ()) -> Run:
    """Open the process group, check and prepare the run directory, build (or reload) the model and optimiser.

    `deliberate`: the train fields given by --set, which a resumed run may change (`state.resume_config`).
    """
    from mmcross.factory import BEST_CHECKPOINT, LAST_CHECKPOINT, checkpoint_metadata, load_checkpoint, load_matcher

    cfg = run.train
    start_time = time.perf_counter()
    rank, size, device = setup_training(cfg.device)
    last_path = run_dir / LAST_CHECKPOINT
    if rank == 0 and run_dir.is_dir():
        recover(run_dir)  # a checkpoint commit a kill interrupted: finished or discarded
    if size > 1:
        dist.barrier()
    if resume and (problem := nothing_to_resume(run_dir)):
        raise FileNotFoundError(problem)
    asked: dict[str, list] = {}
    if resume:  # refuses another run's settings, before anything is written
        run, asked = resume_config(run_dir, run, deliberate)
        cfg = run.train
    elif rank == 0 and not nothing_to_resume(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    torch.manual_seed(mix_seed(cfg.seed, 0, rank))
    if resume:
        matcher = load_checkpoint(last_path, device=device)
    else:  # before anything is written: a model that cannot be built leaves the folder as it was
        matcher = load_matcher(run.model_ref(), device=device)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # (a resumed run's config.json: once its checkpoint and optimiser state have loaded, below)
            for name in (LOG_FILE, BEST_CHECKPOINT):  # a run killed before its first checkpoint: stale, it restarts
                (run_dir / name).unlink(missing_ok=True)
            (run_dir / CONFIG_FILE).write_text(json.dumps(to_dict(run), indent=2) + "\n")
    set_trainable(matcher, cfg.trainable, cfg.last_n_blocks)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    weights = LossWeights(
        cfg.itc_weight,
        cfg.itm_weight,
        cfg.vse_weight,
        cfg.vse_margin,
        cfg.itm_uniform_negatives,
        cfg.itm_detach,
        cfg.itm_rank_weight,
    )
    loss = MatchingLoss(weights, cfg.init_temperature).to(device)
    module = TrainModule(matcher, loss)
    model: nn.Module = module
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=not (cfg.itc_weight and cfg.itm_weight) or cfg.itm_start > 0,
        )
    if cfg.autocast == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # emulated bf16 is several times slower than fp32: the run keeps its steps and computes them in fp32
        if rank == 0:
            tell("train.autocast=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so the run stays fp32")
    optimizer, scheduler = optimizer_and_schedule(module, cfg)
    state = Run(cfg, run_dir, rank, size, device, matcher, loss, module, model, optimizer, scheduler, start_time)
    # the head learns in a step only from the ITM loss, and only where its weights train
    state.head_learns = cfg.itm_weight > 0 and any(p.requires_grad for p in matcher.head.parameters())
    if resume:
        if cfg.fusion_steps and json.loads((run_dir / STATE_JSON).read_text())["step"] > cfg.max_steps:
            # a checkpoint inside the fusion phase holds that phase's optimiser (one at max_steps, the towers')
            enter_fusion_phase(state)
        doc = load_state(run_dir, state.optimizer, state.scheduler, loss, device)
        state.step, state.best = doc["step"], doc.get("best")
        saved = checkpoint_metadata(last_path).get("step")
        if saved != str(state.step):
            raise ValueError(
                f"cannot resume {run_dir}: {LAST_CHECKPOINT} is of step {saved} but {STATE_JSON} of step {state.step}"
            )
        total = cfg.max_steps + cfg.fusion_steps
        if asked and state.step >= total:  # else config.json would say the run's steps were taken with them
            changed = ", ".join(f"train.{name}" for name in asked)
            raise ValueError(
                f"cannot resume {run_dir} with {changed} changed: it has taken all {total} of its steps, so none "
                f"would use the change; give a longer schedule (--set train.max_steps=N or train.fusion_steps=N)"
            )
        truncate_log(run_dir / LOG_FILE, state.step)
        if rank == 0 and read_run_cfg(run_dir) != run:  # only when something changed, and only once it loaded
            (run_dir / CONFIG_FILE).write_text(json.dumps(to_dict(run), indent=2) + "\n")
        state.resumed_with = asked
        if asked and rank == 0:  # from here the steps are neither run's: the log says where the settings changed
            log.warning("resumed at step %d with changed settings: %s", state.step, asked)
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.step, "resumed_with": asked}) + "\n")
    return state


def itm_start_step(cfg: TrainCfg) -> int:
    """Optimiser steps taken with ITC alone before the ITM turns on (`train.itm_start`)."""
    return round(cfg.itm_start * cfg.max_steps)


def train_step(r: Run, batches, plan_per_epoch: int, window: dict[str, float]) -> dict[str, Any]:
    """One optimiser step over `accum_steps` micro-batches; returns its log entry."""
    cfg = r.cfg
    torch.manual_seed(mix_seed(cfg.seed, r.step, r.rank, 3))  # dropout and hard negatives of this step
    sums: dict[str, float] = {}
    used = False  # did any micro-batch of this step reach the losses
    itm = r.step >= itm_start_step(cfg)  # (r.step steps are done: this is step r.step + 1)
    for a in range(cfg.accum_steps):
        mb: MicroBatch = next(batches)
        # together under DDP: a rank that skipped alone would leave the others waiting in ITC's gather and DDP's
        # gradient all-reduce (streamed rejects can empty one rank's slice only)
        if any_rank(mb.n < 2, r.device):
            log.warning("skipping a micro-batch with %d usable images (on this rank)", mb.n)
            continue
        used = True
        sync = r.size == 1 or a == cfg.accum_steps - 1
        with nullcontext() if sync else r.model.no_sync(), autocast_context(cfg.autocast, r.device):
            if isinstance(mb.images, ImageFeatures):
                out = r.model(None, None, mb.images, mb.texts, known=mb.known, itm=itm)
            else:
                out = r.model(mb.images, mb.texts, pairs=mb.pairs, known=mb.known, image_rows=mb.image_rows, itm=itm)
        (out["loss"] / cfg.accum_steps).backward()
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / cfg.accum_steps
        window["samples"] += mb.n * r.size
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(r.module.parameters(), cfg.grad_clip)
    lr = r.optimizer.param_groups[0]["lr"]
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    if used and itm and r.head_learns and r.matcher.head_steps is not None:
        r.matcher.head_steps += 1  # recorded in every checkpoint: `search --rerank` refuses a head never trained
    now = time.perf_counter()
    return {
        "step": r.step,
        "epoch": round((r.step - r.phase_start) * cfg.accum_steps / plan_per_epoch, 4),
        **({"phase": "fusion"} if r.phase_start else {}),
        **{k: round(v, 6) for k, v in sums.items()},
        "lr": lr,
        "temperature": round(float(1 / r.loss.itc.scale().detach()), 6),
        "samples_per_s": round(window["samples"] / max(now - window["start"], 1e-9), 2),
        "elapsed_s": round(now - r.start_time, 2),
    }


def evaluate_and_checkpoint(r: Run, eval_records: list[Record], log_file, final: bool) -> None:
    """Dev evaluation (best.safetensors keeps the best) and last.safetensors + state, when their turn has come."""
    from mmcross.evaluate import evaluate
    from mmcross.factory import save_checkpoint

    cfg = r.cfg
    if eval_records and ((cfg.eval_every and r.step % cfg.eval_every == 0) or final):
        k = cfg.eval_rerank_k if r.matcher.head_trained else 0  # e.g. itm_weight 0: its head would rank by noise
        r.last_eval = evaluate(
            r.matcher,
            eval_records,
            k,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            on_rejects=lambda found: _log_rejects(r.reject_log, found),  # dev images too (written once)
        )
        if k < cfg.eval_rerank_k:
            r.last_eval["rerank_skipped"] = "untrained head"
        # the dual encoder's rsum: every evaluation has it (a re-ranked one needs a trained head, which a run with
        # train.itm_start has only later), so the best of the run compares like with like
        score = r.last_eval["metrics"]["rsum"]
        # in the fusion phase the towers are frozen, so the dual rsum stays: the later head takes a tie
        if r.best is None or score > r.best or (r.phase_start and score >= r.best):
            r.best = score
            save_checkpoint(r.matcher, r.run_dir / "best.safetensors", {"step": str(r.step), "rsum": str(score)})
        log_file.write(json.dumps({"step": r.step, "eval": r.last_eval}) + "\n")
        log_file.flush()
        r.module.train()
    if (cfg.ckpt_every and r.step % cfg.ckpt_every == 0) or final:
        if r.is_main:
            info = {"step": r.step, "best": r.best}
            save_checkpoint_and_state(r.run_dir, r.matcher, r.optimizer, r.scheduler, r.loss, info)
        if r.size > 1:
            dist.barrier()


def fit(
    run: RunCfg,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
    deliberate: Collection[str] = (),
) -> FitResult:
    """Train the matcher `run` describes and write the run directory (see `mmcross.train`).

    Args:
        run: model, weights, architecture overrides and `TrainCfg`.
        run_dir: output folder; `mmcross eval --checkpoint RUN_DIR` then loads its best (else last) checkpoint.
        resume: continue from `run_dir`'s last checkpoint (steps already done are kept); `run` may differ from the
            run's config.json only in `state.RESUMABLE` fields and the train fields named in `deliberate` (anything
            else is refused before anything is written).
        progress: show progress on stderr (rank 0): a bar on a terminal, a line every ~30 s otherwise.
        on_step: called with each step's log entry (tests use it to stop a run).
        deliberate: `TrainCfg` fields the user set on purpose (`--set train.X`), which a resumed run may change.
    """
    cfg = run.train
    check_cfg(cfg)
    # a fresh run's data problems before anything is written; a resumed run's once its settings are found its own
    negatives = None if resume else dataset_negatives(cfg)
    r = start_run(run, Path(run_dir), resume, deliberate)
    negative_of, also_true = negatives or dataset_negatives(cfg)
    records, read_rejects = read_records(cfg.data, cfg, cfg.split)
    eval_records: list[Record] = []
    if cfg.eval_split and r.is_main:
        eval_records = read_records(cfg.eval_data or cfg.data, cfg, cfg.eval_split, "train.eval_split")[0]
        eval_records = eval_records[: cfg.eval_max_images]
    rejects = RejectLog(r.run_dir, keep=resume) if r.is_main else None  # every job records what it could not use
    r.reject_log = rejects
    if cfg.fusion_steps and len(records) < cfg.fusion_batch_size * r.size:  # now, not after all the towers' steps
        raise ValueError(
            f"{len(records)} training images are fewer than one fusion-phase batch: train.fusion_batch_size "
            f"({cfg.fusion_batch_size}) x {r.size} process(es)"
        )
    _log_rejects(rejects, read_rejects)
    total = cfg.max_steps + cfg.fusion_steps  # the towers' steps, then the fusion phase's (`train.fusion_steps`)
    source, batches = None, None
    logged: set[tuple] = set()  # reject paths already written: the fusion phase re-reads the images phase one did
    bar = Progress(total, "train", "steps", enabled=progress and r.is_main, done=r.step)
    log_file = (r.run_dir / LOG_FILE).open("a") if r.is_main else None
    stopped_by = "max_steps"
    try:
        while r.step < total:
            if source is None or (r.step == cfg.max_steps and not r.phase_start):
                if r.step == cfg.max_steps:  # the towers are done (or were, in the run being resumed)
                    if not r.phase_start:
                        enter_fusion_phase(r)
                    log.info("fusion phase: encoders frozen; encoding the training set once")
                source = None  # the towers' decoded-image cache goes before the feature cache is built
                try:
                    source = BatchSource(r.matcher, records, r.cfg, r.rank, r.size, negative_of, also_true)
                except NothingReadable as err:
                    _log_rejects(rejects, err.rejects)
                    raise
                _log_new_rejects(rejects, source, logged, r.size)  # the decode or feature cache's, first
                done = (r.step - r.phase_start) * r.cfg.accum_steps
                # once, where the phase starts: a resumed run's log stays the uninterrupted one's
                if log_file and cfg.paraphrase_share > 0 and source.unit_texts is not None and done == 0:
                    chosen = {"paraphrase_share": cfg.paraphrase_share, "paraphrase_cosine": source.paraphrase_cosine}
                    log_file.write(json.dumps({"step": r.step, **chosen}) + "\n")
                    log.info(
                        "paraphrases: cosine %.4f marks %.3g of the batches' pairs",
                        source.paraphrase_cosine,
                        cfg.paraphrase_share,
                    )
                batches = source.batches(done, (r.cfg.max_steps - r.step + r.phase_start) * r.cfg.accum_steps)
                window = {"samples": 0.0, "start": time.perf_counter()}
                r.module.train()
            try:
                entry = train_step(r, batches, source.plan.per_epoch, window)
            except NothingReadable as err:
                _log_rejects(rejects, err.rejects)
                raise
            _log_new_rejects(rejects, source, logged, r.size)  # streamed: met loading this step's images
            r.losses.append(entry)
            # a step whose micro-batches were all skipped (too few images loaded) has no loss
            loss = f"loss {entry['loss']:.4f}" if "loss" in entry else "no usable batch"
            bar.update(r.step, f"{loss} lr {entry['lr']:.2e}")
            if log_file and (r.step % max(cfg.log_every, 1) == 0 or r.step in (cfg.max_steps, total)):
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                window = {"samples": 0.0, "start": time.perf_counter()}
            elapsed_min = (time.perf_counter() - r.start_time) / 60
            out_of_time = any_rank(cfg.max_minutes > 0 and elapsed_min >= cfg.max_minutes, r.device)
            # the towers' last step is evaluated and checkpointed too: the dual encoder is final there
            final = r.step in (cfg.max_steps, total) or out_of_time
            evaluate_and_checkpoint(r, eval_records, log_file, final=final)
            if on_step is not None:
                on_step(entry)
            if out_of_time:
                stopped_by = "max_minutes"
                if r.rank == 0:
                    tell(f"stopping at step {r.step}: train.max_minutes={cfg.max_minutes} reached")
                break
        if log_file:
            # what the run promised (max_steps + fusion_steps) and what it did: a safety stop is never silent
            done = {"step": r.step, "stopped_by": stopped_by, "max_steps": cfg.max_steps}
            if cfg.fusion_steps:
                done["fusion_steps"] = cfg.fusion_steps
            done["versions"] = _versions()  # bf16 runs of one recipe part ways across torch builds: say which
            log_file.write(json.dumps({**done, "elapsed_s": round(time.perf_counter() - r.start_time, 2)}) + "\n")
    finally:
        if log_file:
            log_file.close()
        bar.close()
    seconds = time.perf_counter() - r.start_time
    result = FitResult(r.run_dir, r.step, seconds, r.best, r.last_eval, r.losses, r.matcher, stopped_by)
    result.resumed_with = r.resumed_with
    result.rejects = rejects.count if rejects is not None else len(source.rejects if source else [])
    return result


def _versions() -> dict[str, str]:
    """torch, open_clip and mmcross versions of this process (the run log's last line records them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in ("open_clip_torch", "mmcross"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _log_new_rejects(log_: RejectLog | None, source: BatchSource, logged: set[tuple], size: int = 1) -> None:
    """Write the source's rejects not written yet (the fusion phase re-reads the images the towers' steps did).

    Under DDP every rank calls this at the same points: streamed, each rank meets the bad images of its own slice,
    and only rank 0 writes the log, so the ranks' new rejects are gathered to it.
    """
    new = source.new_rejects()
    if size > 1:
        gathered: list[list[Reject]] = [[] for _ in range(size)]
        dist.all_gather_object(gathered, new)  # Reject records between this job's own processes
        new = [j for part in gathered for j in part]
    new = [j for j in new if (j.path, j.image_id) not in logged]
    logged.update((j.path, j.image_id) for j in new)
    _log_rejects(log_, new)


def _log_rejects(log_: RejectLog | None, rejects: list[Reject]) -> None:
    if log_ is not None and rejects:
        log_.write(rejects)


def train_from_config(
    config: str | Path | None,
    run_dir: str | Path,
    overrides: dict[str, str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """`mmcross train`: defaults < YAML run config (resumed: the run's config.json) < `--set` overrides, then `fit`,
    then loss.png from its log."""
    from mmcross.config import load_run_cfg

    if resume and (problem := nothing_to_resume(Path(run_dir))):
        raise FileNotFoundError(problem)  # before the config checks, which a run folder without one would fail
    saved = read_run_cfg(Path(run_dir)) if resume and config is None else None
    # resumed without --config, the run's own config is the base that --set changes (`fit` refuses a change to what
    # defines the run); with one, that config must resolve to the same run
    run = load_run_cfg(config, overrides, base=saved)
    deliberate = [key.removeprefix("train.") for key in overrides or {} if key.startswith("train.")]
    result = fit(run, run_dir, resume=resume, progress=progress, deliberate=deliberate)
    if (result.run_dir / LOG_FILE).is_file() and world()[0] == 0:  # rank 0 wrote the log: its loss curve beside it
        from mmcross.report.plots import loss_curve

        result.loss_curve = loss_curve(result.run_dir / LOG_FILE)
    return result


__all__ = ["FitResult", "fit", "set_trainable", "train_from_config"]
