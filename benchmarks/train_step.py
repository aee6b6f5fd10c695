"""Where a training step's time goes, measured on the real `mmcross train` of a run config.

Usage: python -m benchmarks.train_step [--config configs/flickr8k-scratch.yaml] [--phase towers fusion]
       [--steps 24] [--warmup 4] [--set KEY=VALUE ...]

Runs `train_from_config` on the config for a few steps of each phase in a scratch run folder and clocks, inside
the optimiser steps only (the feature cache's encoding and the evaluations are left out): data (reading and
cropping the decoded cache or the feature cache, tokenising), the image and caption towers' forward, the losses'
forward (ITC, and the ITM with its fusion and head), backward, and the rest of the step (gradient clip, optimiser,
schedule). The first `warmup` steps of each phase are not counted. CPU ops run synchronously; on a GPU every clocked
part starts and ends with a synchronise, so the parts add up to the step (at the price of the overlap of host and
device work that an unclocked step has: `s_per_step` is then an upper bound).

- towers: the config's towers' steps (`train.fusion_steps=0`; with the ITM from step 0 where the config's towers'
  steps have it at all, `train.itm_start` < 1).
- fusion: two towers' steps, then the fusion phase on the feature cache (`train.fusion_steps`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

from mmcross.config import load_run_cfg
from mmcross.losses import MatchingLoss
from mmcross.model import Matcher
from mmcross.train import loop
from mmcross.train.plan import BatchSource

PARTS = ("data", "image fwd", "text fwd", "losses fwd", "backward")


def _gpu_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync() -> None:
    """Wait for the GPU's queued work, where a GPU is in use (its kernels run after the call that queued them)."""
    if _gpu_in_use():
        torch.cuda.synchronize()


class StepClock:
    """Seconds per part of the optimiser steps that run while `clocked()` is active."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.seconds = dict.fromkeys((*PARTS, "step"), 0.0)
        self.steps = 0
        self.samples = 0.0
        self.inside = False  # only time spent inside `train_step` counts (not the feature cache's encoding)
        self.seen = 0

    def counting(self) -> bool:
        return self.inside and self.seen > self.warmup

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            if not self.counting():
                return fn(*args, **kwargs)
            _sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.seconds[part] += time.perf_counter() - start

        return wrapper

    def timed_batches(self, fn):
        def wrapper(*args, **kwargs):
            return self._timed_iter(fn(*args, **kwargs))

        return wrapper

    def _timed_iter(self, batches: Iterator) -> Iterator:
        while True:
            if self.counting():
                _sync()
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:  # a streamed run's batches end (PEP 479 would turn this into a RuntimeError)
                return
            if self.counting():
                _sync()
                self.seconds["data"] += time.perf_counter() - start
            yield item

    def timed_step(self, fn):
        def wrapper(r, batches, plan_per_epoch, window):
            self.inside, self.seen = True, self.seen + 1
            before = window["samples"]
            if self.counting():
                _sync()
            start = time.perf_counter()
            try:
                return fn(r, batches, plan_per_epoch, window)
            finally:
                if self.counting():
                    _sync()
                    self.seconds["step"] += time.perf_counter() - start
                    self.steps += 1
                    self.samples += window["samples"] - before
                self.inside = False

        return wrapper

    @contextmanager
    def clocked(self):
        with (
            mock.patch.object(loop, "train_step", self.timed_step(loop.train_step)),
            mock.patch.object(BatchSource, "batches", self.timed_batches(BatchSource.batches)),
            mock.patch.object(Matcher, "encode_image", self.timed("image fwd", Matcher.encode_image)),
            mock.patch.object(Matcher, "encode_text", self.timed("text fwd", Matcher.encode_text)),
            mock.patch.object(MatchingLoss, "forward", self.timed("losses fwd", MatchingLoss.forward)),
            mock.patch.object(torch.Tensor, "backward", self.timed("backward", torch.Tensor.backward)),
        ):
            yield self

    def report(self) -> dict:
        total = self.seconds["step"]
        if not self.steps or total <= 0:
            raise RuntimeError("no optimiser step was timed (too few steps for the warm-up?)")
        parts = {k: self.seconds[k] for k in PARTS}
        parts["clip, optimiser, rest"] = max(total - sum(parts.values()), 0.0)
        return {
            "steps_timed": self.steps,
            "s_per_step": round(total / self.steps, 3),
            "pairs_per_s": round(self.samples / total, 1),
            "share": {k: round(v / total, 3) for k, v in parts.items()},
        }


def phase_overrides(phase: str, steps: int, itm_in_towers: bool) -> dict[str, str]:
    """`--set` overrides that make a short run of one phase, without evaluations. `itm_in_towers`: the config's
    towers' steps run the ITM (`train.itm_start` < 1); when they do not, the towers' run turns it off."""
    common = {"train.eval_split": "null", "train.max_minutes": "0", "train.log_every": "1000", "train.ckpt_every": "0"}
    if phase == "fusion":
        return {**common, "train.max_steps": "2", "train.fusion_steps": str(steps)}
    towers = {**common, "train.max_steps": str(steps), "train.fusion_steps": "0", "train.neighbour_batches": "0"}
    return towers if itm_in_towers else {**towers, "train.itm_weight": "0", "train.itm_start": "0"}


def measure(config: str, phase: str, steps: int, warmup: int, overrides: dict[str, str]) -> dict:
    """Time `steps` optimiser steps of `phase` (the first `warmup` not counted) of the config's run."""
    itm_in_towers = load_run_cfg(config, overrides).train.itm_start < 1.0
    clock = StepClock(warmup + (2 if phase == "fusion" else 0))  # the fusion run's two towers' steps go first
    with tempfile.TemporaryDirectory() as run_dir, clock.clocked():
        sets = {**overrides, **phase_overrides(phase, steps + warmup, itm_in_towers)}  # the phase has the last word
        loop.train_from_config(config, run_dir, sets, progress=False)
    device = torch.cuda.get_device_name() if _gpu_in_use() else "cpu"
    return {"phase": phase, "device": device, "threads": torch.get_num_threads(), **clock.report()}


CONFIG = "configs/flickr8k-scratch.yaml"


def run() -> dict[str, float]:
    """`make bench`'s figures: both phases of the Flickr8k config (run from the repository root)."""
    results: dict[str, float] = {}
    for phase in ("towers", "fusion"):
        out = measure(CONFIG, phase, steps=24, warmup=4, overrides={})
        results[f"train_step.{phase}.s_per_step"] = out["s_per_step"]
        results[f"train_step.{phase}.pairs_per_s"] = out["pairs_per_s"]
        results.update({f"train_step.{phase}.share.{k}": v for k, v in out["share"].items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--phase", nargs="+", choices=("towers", "fusion"), default=["towers", "fusion"])
    parser.add_argument("--steps", type=int, default=24, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=4, help="steps per phase not timed (oneDNN warms up)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(s.split("=", 1) for s in args.sets)
    results = []
    for phase in args.phase:  # a phase the config cannot run is said, and the other's figures are kept
        try:
            results.append(measure(args.config, phase, args.steps, args.warmup, overrides))
        except ValueError as err:
            results.append({"phase": phase, "skipped": str(err)})
        print(f"{phase}: {json.dumps(results[-1])}", file=sys.stderr)
    print(json.dumps({"config": args.config, "overrides": overrides, "phases": results}, indent=2))


if __name__ == "__main__":
    main()
