"""Training state without pickle: optimiser tensors, temperature and RNG in safetensors, the rest in JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from mmcross.config import (
    MatcherCfg,
    RunCfg,
    TrainCfg,
    apply_overrides,
    flatten_dotted,
    from_dict,
    list_presets,
    to_dict,
)
from mmcross.factory import LAST_CHECKPOINT, checkpoint_metadata, resolve_cfg, write_checkpoint_file
from mmcross.losses import MatchingLoss
from mmcross.model import Matcher

STATE_TENSORS, STATE_JSON, LOG_FILE, CONFIG_FILE = "state.safetensors", "state.json", "log.jsonl", "config.json"


# One checkpoint commit, in rename order: the weights, then the optimiser state, and state.json last.
COMMIT = (LAST_CHECKPOINT, STATE_TENSORS, STATE_JSON)


def _tmp(run_dir: Path, name: str) -> Path:
    return run_dir / (name + ".tmp")


def save_checkpoint_and_state(
    run_dir: Path, matcher: Matcher, optimizer, scheduler, loss: MatchingLoss, info: dict[str, Any]
) -> None:
    """last.safetensors, state.safetensors and state.json as one commit that a kill cannot leave half done.

    All three are written under temporary names first, state.json.tmp last, so a complete state.json.tmp means the
    other two are complete; then they are renamed in `COMMIT` order. A kill while writing leaves the previous
    commit whole (`recover` deletes the temporary files); a kill between renames leaves a complete state.json.tmp,
    from which `recover` finishes the renames. `info` needs "step".
    """
    write_checkpoint_file(matcher, _tmp(run_dir, COMMIT[0]), {"step": str(info["step"])})
    save_state(run_dir, optimizer, scheduler, loss, info, rename=False)
    for name in COMMIT:
        _tmp(run_dir, name).replace(run_dir / name)


def recover(run_dir: Path) -> None:
    """Finish or discard the checkpoint commit a kill interrupted (see `save_checkpoint_and_state`)."""
    complete = _complete_json(_tmp(run_dir, STATE_JSON))
    for name in COMMIT:
        tmp = _tmp(run_dir, name)
        if tmp.is_file():
            if complete:
                tmp.replace(run_dir / name)
            else:
                tmp.unlink()
    _tmp(run_dir, "best.safetensors").unlink(missing_ok=True)  # a best checkpoint cut short (the old one stands)


def _complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def nothing_to_resume(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be resumed (no committed checkpoint, e.g. a run that failed before its first), or None."""
    if (run_dir / COMMIT[0]).is_file() and (run_dir / STATE_JSON).is_file():
        return None
    if _complete_json(_tmp(run_dir, STATE_JSON)):  # a commit `recover` will finish
        return None
    if not run_dir.is_dir():
        return f"nothing to resume: {run_dir} does not exist; run without --resume to start a run there"
    return (
        f"nothing to resume in {run_dir}: no checkpoint was written (no {COMMIT[0]} with {STATE_JSON}; the run "
        "failed or was stopped before its first checkpoint); run without --resume to start it again"
    )


# The `TrainCfg` fields a resumed run may change: how and where it runs, not what it computes. Batches are a fixed
# function of the seed (workers and threads only change who computes them); log, checkpoint and dev-evaluation timing
# and the re-rank depth do not touch the weights (best.safetensors is chosen by the dual rsum, on the same dev images:
# eval_data, eval_split and eval_max_images stay); max_minutes is a safety stop per invocation; device moves a killed
# job to other hardware. decode_cache and decode_cache_max_gb stay: they choose between crops of cached arrays and
# the open_clip transform of streamed files, which are not the same pixels.
RESUMABLE = ("max_minutes", "workers", "threads", "log_every", "ckpt_every", "eval_every", "eval_rerank_k", "device")
# Not even on purpose: what trains decides the optimiser's parameter groups, which the restored state must match.
OPTIMISER_FIXED = ("trainable", "last_n_blocks")


def read_run_cfg(run_dir: Path) -> RunCfg | None:
    """The `RunCfg` a run directory's config.json records, or None without one."""
    path = run_dir / CONFIG_FILE
    return from_dict(RunCfg, json.loads(path.read_text())) if path.is_file() else None


def model_file_gone(model: str | None) -> bool:
    """`model` names a JSON config file (no preset of that name) that is no longer there."""
    return bool(model) and model not in list_presets() and not Path(model).is_file()


def resume_config(run_dir: Path, run: RunCfg, deliberate: Collection[str] = ()) -> tuple[RunCfg, dict[str, list]]:
    """The config a resumed run goes on with: its saved config.json with `run`'s `RESUMABLE` fields, and with the
    `TrainCfg` fields named in `deliberate` (given by `--set`: a longer schedule, a fusion phase after the towers).

    Returns:
        The config, and the deliberate changes {field: [the run's value, the new one]}: from here the steps differ
        from an uninterrupted run of either config, so the caller says so.

    Raises:
        ValueError: `run` differs from the saved run in anything else (a field that changed without being asked for:
            another --config, defaults), or its architecture, weights or ranking weight from the checkpoint's (which
            the weights come from); one line naming each field and both values.
    """
    saved = read_run_cfg(run_dir)
    changed = []
    if saved is not None:
        changed = [
            (k, getattr(saved, k), getattr(run, k))
            for k in ("model", "pretrained")
            if getattr(saved, k) != getattr(run, k)
        ]
    if not changed:  # (another model: not each field it sets) the architecture as resolved, so `--set fusion.dim=128`
        # on a run of dim 128 is no change, against the checkpoint's, which the weights come from
        meta = checkpoint_metadata(run_dir / LAST_CHECKPOINT)
        had = flatten_dotted(to_dict(from_dict(MatcherCfg, json.loads(meta["config"]))))
        if model_file_gone(run.model):  # a run's JSON model file moved or deleted since: the checkpoint holds the
            # architecture the run goes on with, and only --set overrides could change it
            base = from_dict(MatcherCfg, json.loads(meta["config"]))
            wants = flatten_dotted(to_dict(apply_overrides(base, run.matcher)))
        else:
            wants = flatten_dotted(to_dict(resolve_cfg(run.model, run.pretrained, run.matcher)))
        changed = [
            (k, had[k], wants.get(k)) for k in had if k not in ("name", "description") and had[k] != wants.get(k)
        ]
    asked: dict[str, list] = {}
    if saved is not None:
        for f in (field.name for field in dataclasses.fields(TrainCfg)):
            was, now = getattr(saved.train, f), getattr(run.train, f)
            if f in RESUMABLE or was == now:
                continue
            if f in deliberate and f not in OPTIMISER_FIXED:
                asked[f] = [was, now]
            else:
                changed.append((f"train.{f}", was, now))
    if changed:
        what = "; ".join(f"{k}: the run has {json.dumps(a)}, not {json.dumps(b)}" for k, a, b in changed)
        allowed = ", ".join(f"train.{f}" for f in RESUMABLE)
        raise ValueError(
            f"cannot resume {run_dir} with other settings ({what}); {allowed} may change, and other train fields "
            f"only on purpose, each given with --set; never the architecture, nor {', '.join(OPTIMISER_FIXED)} (the "
            f"optimiser state restored from the checkpoint has their parameter groups)"
        )
    if saved is None:
        return run, asked
    kept = {f: getattr(run.train, f) for f in (*RESUMABLE, *asked)}
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, **kept)), asked


def save_state(
    run_dir: Path, optimizer, scheduler, loss: MatchingLoss, info: dict[str, Any], rename: bool = True
) -> None:
    """Optimiser tensors, temperature and RNG state to state.safetensors; everything else to state.json.

    With `rename` False both stay under their temporary names (`save_checkpoint_and_state` renames them).
    """
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
    tmp_t, tmp_j = _tmp(run_dir, STATE_TENSORS), _tmp(run_dir, STATE_JSON)
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(doc, indent=1))
    if rename:
        tmp_t.replace(run_dir / STATE_TENSORS)
        tmp_j.replace(run_dir / STATE_JSON)


def load_state(run_dir: Path, optimizer, scheduler, loss: MatchingLoss, device) -> dict[str, Any]:
    """Restore what `save_state` wrote; returns state.json's content.

    The moments and step counts come from the file, the learning rates and weight decay from `optimizer` and
    `scheduler` as the run's config built them: a resumed run given another `train.lr` (`--set`) uses it, where the
    saved groups' values would silently win. With the same config this changes no number.
    """
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
    configured = [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    scheduler.load_state_dict({**doc["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    scheduler.base_lrs = [initial for initial, _ in configured]
    for group, (initial, decay), factor in zip(optimizer.param_groups, configured, scheduler.lr_lambdas):
        group.update(initial_lr=initial, weight_decay=decay, lr=initial * factor(scheduler.last_epoch))
    with torch.no_grad():
        loss.itc.logit_scale.copy_(tensors["loss.logit_scale"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return doc


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a run killed between checkpoints)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line a kill tore mid-write: it belongs to no checkpoint
            continue
        if entry is not None and entry["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
