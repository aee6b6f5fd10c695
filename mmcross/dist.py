"""torchrun set-up shared by training and indexing: ranks from the environment, the process group, barriers."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_from_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    r = rank if rank is not None else int(os.environ.get("RANK", 0))
    w = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in 0..{w - 1}")
    return r, w


def join(rank: int, world_size: int, backend: str = "gloo") -> bool:
    """Join torchrun's process group when there is one (world size >= 2 and MASTER_ADDR set); True when joined.

    Without a group, ranks still split work (`--rank/--world-size` by hand) but cannot wait for each other.
    """
    if world_size < 2 or "MASTER_ADDR" not in os.environ or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return True


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str, option: str) -> str:
    """`name` (auto, cpu, cuda or cuda:N) checked against this machine, auto resolved: one line naming `option`
    instead of torch's error (a traceback at the first tensor moved, or a model that "cannot be built")."""
    if not DEVICE.fullmatch(name):
        raise ValueError(f"{option} is auto, cpu, cuda or cuda:N, not {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name.partition(":")[2] or 0) >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device (or a torch build without CUDA)"
            raise ValueError(f"{option}={name}, but this machine has {found}; use {option}=cpu or auto")
    return name


def setup_training(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Join the group of a `torchrun` training job (NCCL on CUDA, gloo on CPU); (rank, world size, device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = check_device(device_name, "train.device").startswith("cuda")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = world()
    if not cuda:
        return rank, size, torch.device("cpu")
    if size > 1:
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    else:
        device = torch.device("cuda" if device_name == "auto" else device_name)
        if device.index is None:  # set_device and DDP's device_ids need an index ("cuda" alone raises)
            device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return rank, size, device


def barrier() -> bool:
    """Wait for every rank; False (and no wait) without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def row_counts(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's row count, in rank order ([rows] without a process group): batches differ in size when a
    rank drops rows (an image that fails to decode while streaming)."""
    size = world()[1]
    if size == 1:
        return [rows]
    mine = torch.tensor([rows], device=device)
    counts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when any rank says True (so all ranks stop together)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())
