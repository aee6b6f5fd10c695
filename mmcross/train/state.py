"""Training state without pickle: optimiser tensors, temperature and RNG in safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmcross.losses import MatchingLoss

STATE_TENSORS, STATE_JSON, LOG_FILE, CONFIG_FILE = "state.safetensors", "state.json", "log.jsonl", "config.json"


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


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (a run killed between checkpoints)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
