"""`make bench-train`: mmcross's trainer against open_clip's own (`open_clip_train`) on the same tower, data and wall.

Both train the architecture `configs/flickr8k-scratch.yaml` names (its preset's open_clip config, e.g.
`mmcross-rn-small`, registered for the peer with `open_clip.add_model_config`) from random initialisation on the
Flickr8k train split for the same wall budget (default 15 minutes each; `--full` for 60), each with its own recipe
and the same warm-up share. Each schedule is
sized to the budget from that trainer's own throughput, measured first in a short probe run, so both finish their
cosine inside the budget:

- mmcross: `mmcross train --config configs/flickr8k-scratch.yaml` (its batch, captions per image, learning rate,
  losses) with `train.max_steps` sized from the steady rates of its phases (ITC alone, and ITC + ITM where the
  config's `itm_start` turns the ITM on before its last step) in a 40-step probe; the decoded-image cache is built
  by the probe (its time is reported apart). The config's fusion phase (`train.fusion_steps`) is left out: it
  trains the fusion on frozen towers and changes no dual-encoder score, which is what this benchmark compares.
- open_clip_train: InfoNCE, batch 128, lr 1e-3, weight decay 0.1, its CSV loader (pandas; `pip install -e
  '.[peers]'`) over a CSV with every caption of every image, shuffled and repeated to budget x its samples/s rows,
  one epoch, one decoding worker (the other core goes to its torch threads), its default augmentation, and the
  same precision as ours (`--precision amp_bf16` when the config sets `train.autocast: bf16`, else fp32).

Both checkpoints are then evaluated by `mmcross eval` on the 1,000 dev images (the peer's, converted to
safetensors, through `--pretrained`, dual encoder only: it has no match head). Output: one JSON file.

Usage: python -m benchmarks.bench_train [--minutes 15 | --full] [--out bench-train.json] [--work build/bench-train]
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
CONFIG = ROOT / "configs" / "flickr8k-scratch.yaml"
BATCH, LR, WD, WARMUP_SHARE, SEED = 128, 1e-3, 0.1, 0.08, 0
PROBE_STEPS = 20  # the peer's probe: its rate is flat after the first steps
OURS_PROBE_STEPS = 40  # ours: long enough for steady windows of both phases (ITC alone, then ITC + ITM)
STARTUP_S = 15  # our run's start-up before its first step (model, cache mapping): ~9 s measured, with a margin
MMCROSS = [sys.executable, str(ROOT / "cli.py")]
PEER = (
    "import sys, open_clip; from mmcross.config import PRESET_DIR; "
    "open_clip.add_model_config(PRESET_DIR / 'open_clip'); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def _run(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output to `log`; returns its wall seconds; raises with the log's tail on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}:\n{tail}")
    return time.perf_counter() - start


def _pairs() -> list[tuple[str, str]]:
    """(image path, caption) of every caption of the Flickr8k train split, as mmcross reads it."""
    from mmcross.config import DataCfg
    from mmcross.data.registry import open_dataset

    records = open_dataset(str(FLICKR8K), DataCfg(format="flickr", split="train")).records()
    return [(str(r.path), caption) for r in records if r.path is not None for caption in r.captions]


def _peer_csv(pairs: list[tuple[str, str]], rows: int, path: Path) -> None:
    """`rows` pairs: shuffled passes over every caption (each pass a new order), as open_clip's CsvDataset reads."""
    rng = random.Random(SEED)
    out: list[tuple[str, str]] = []
    while len(out) < rows:
        order = pairs[:]
        rng.shuffle(order)
        out.extend(order)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(out[:rows])


def _peer(work: Path, name: str, csv_path: Path, steps: int, precision: str) -> list[str]:
    tower = _ours_cfg().model
    return [
        sys.executable, "-c", PEER,
        "--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", _open_clip_name(tower), "--batch-size", str(BATCH), "--epochs", "1",
        "--lr", str(LR), "--wd", str(WD), "--warmup", str(max(1, round(WARMUP_SHARE * steps))),
        "--workers", "1", "--precision", precision, "--device", "cpu", "--seed", str(SEED),
        "--save-frequency", "1", "--log-every-n-steps", "5", "--logs", str(work), "--name", name,
    ]  # fmt: skip


def _peer_rate(log: Path) -> float:
    """The last samples/s figure open_clip_train printed."""
    rates = re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", log.read_text())
    if not rates:
        raise RuntimeError(f"no throughput line in {log}")
    return float(rates[-1])


@functools.cache  # one read of the YAML per benchmark
def _ours_cfg():
    """Our run config: its model preset is the tower both trainers train."""
    from mmcross.config import load_run_cfg

    return load_run_cfg(CONFIG)


def _open_clip_name(preset: str) -> str:
    """The open_clip architecture behind one of our presets (what the peer is told to build)."""
    from mmcross.config import load_matcher_cfg

    return load_matcher_cfg(preset).encoder.model_name


def _ours_batch() -> int:
    """Rows (image, caption pairs) per step of our recipe, as the run config sets them."""
    return _ours_cfg().train.batch_size


def _peer_precision() -> str:
    """open_clip_train's --precision matching our config's CPU autocast: both sides compute alike."""
    return "amp_bf16" if _ours_cfg().train.autocast == "bf16" else "fp32"


def _towers_only_itm() -> dict:
    """The ITM settings of our towers' phase without the fusion phase: a config whose ITM runs only in that phase
    (`itm_start` 1.0) trains its towers by ITC alone, and says so as `itm_weight` 0."""
    train = _ours_cfg().train
    return {"train.itm_weight": 0, "train.itm_start": 0} if train.fusion_steps and train.itm_start >= 1.0 else {}


def _ours(out: Path, steps: int, minutes: float, eval_split: str = "null") -> list[str]:
    sets = {  # our recipe as the config has it (batch, captions per image, lr, losses); only the budget is set here
        "train.max_steps": steps,
        "train.warmup_steps": max(1, round(WARMUP_SHARE * steps)),
        "train.max_minutes": minutes,
        "train.eval_split": eval_split,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        "train.log_every": 5,
        "train.seed": SEED,
        "train.data": str(FLICKR8K),
        "train.fusion_steps": 0,  # the towers' phase only: the fusion phase changes no dual-encoder score
        "train.neighbour_batches": 0,  # how the fusion phase draws its batches: no phase here
        **_towers_only_itm(),
    }
    cmd = [*MMCROSS, "train", "--config", str(CONFIG), "--out", str(out), "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def _log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _ours_step_seconds(probe: Path) -> tuple[float, dict]:
    """Seconds per step of our recipe over a whole schedule, from a probe run's steady log windows.

    Our recipe has two phases of different cost: ITC alone for the first `train.itm_start` share of the steps,
    then ITC + ITM. Each phase's rate is the mean of its log windows after the first (which holds the start-up);
    the schedule's time per step is the share-weighted mean of the two phases' times per step.
    """
    windows = [e for e in _log_lines(probe) if "loss" in e][1:]
    itc = [e["samples_per_s"] for e in windows if "itm" not in e]
    both = [e["samples_per_s"] for e in windows if "itm" in e] or itc
    if not itc:
        raise RuntimeError(f"the probe in {probe} logged no steady ITC window; is OURS_PROBE_STEPS too short?")
    rates = {"itc": sum(itc) / len(itc), "itc_itm": sum(both) / len(both)}
    share = _ours_cfg().train.itm_start
    step_s = _ours_batch() * (share / rates["itc"] + (1 - share) / rates["itc_itm"])
    return step_s, {k: round(v, 2) for k, v in rates.items()}


def _eval(work: Path, name: str, model_args: list[str], rerank: int) -> dict:
    out = work / f"{name}-dev.json"
    cmd = [*MMCROSS, "eval", str(FLICKR8K), "--split", "dev", *model_args, "--rerank", str(rerank), "--out", str(out)]
    _run(cmd, work / f"{name}-eval.log")
    doc = json.loads(out.read_text())
    result = {"dual_rsum": doc["metrics"]["rsum"], "dual": doc["metrics"]}
    if doc.get("rerank_metrics"):
        result.update(rerank_k=rerank, rerank_rsum=doc["rerank_metrics"]["rsum"], rerank=doc["rerank_metrics"])
    return result


def _to_safetensors(checkpoint: Path, out: Path) -> Path:
    """open_clip_train's checkpoint (written by this benchmark) -> safetensors; tensors only (weights_only)."""
    import torch
    from safetensors.torch import save_file

    doc = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v.contiguous() for k, v in doc["state_dict"].items()}
    save_file(state, str(out))
    return out


WORK_MARK = ".bench-train"  # marks a --work folder as this benchmark's, so a rerun may replace it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall budget of each trainer")
    parser.add_argument("--full", action="store_true", help="the full hour each (--minutes 60)")
    parser.add_argument("--out", default="bench-train.json")
    parser.add_argument("--work", default="build/bench-train", help="run folders, logs, the peer's CSV")
    args = parser.parse_args()
    minutes = 60.0 if args.full else args.minutes
    try:
        import pandas  # noqa: F401 - open_clip_train's CSV loader
    except ImportError:
        sys.exit("bench-train needs pandas for open_clip_train's CSV loader: pip install -e '.[peers]'")
    work = (ROOT / args.work).resolve()
    if work.exists():  # an earlier bench-train's folder is replaced; any other folder is the user's: never deleted
        ours = (work / WORK_MARK).is_file() or work == (ROOT / "build/bench-train").resolve()  # the default: ours
        if any(work.iterdir()) and not ours:
            sys.exit(f"--work {work} holds files bench-train did not write; give an empty or new folder")
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARK).write_text("written by benchmarks.bench_train; replaced by its next run\n")
    pairs = _pairs()
    budget_s = minutes * 60
    result: dict = {"budget_minutes": minutes, "train_pairs": len(pairs)}
    precision = _peer_precision()
    result["peer_recipe"] = {
        "batch": BATCH, "lr": LR, "weight_decay": WD, "warmup_share": WARMUP_SHARE, "precision": precision
    }  # fmt: skip
    result["mmcross_recipe"] = {
        "config": str(CONFIG.relative_to(ROOT)), "model": _ours_cfg().model, "rows_per_step": _ours_batch()
    }  # fmt: skip
    result["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    # throughput probes (the mmcross one also builds the decoded-image cache, timed apart)
    probe_wall = _run(_ours(work / "probe-mmcross", OURS_PROBE_STEPS, 0), work / "probe-mmcross.log")
    ours_step_s, ours_rates = _ours_step_seconds(work / "probe-mmcross")
    _peer_csv(pairs, PROBE_STEPS * BATCH, work / "probe.csv")
    _run(_peer(work, "probe-peer", work / "probe.csv", PROBE_STEPS, precision), work / "probe-peer.log")
    peer_rate = _peer_rate(work / "probe-peer" / "out.log")
    result["probe"] = {
        "mmcross_samples_per_s": ours_rates,
        "mmcross_seconds_per_step": round(ours_step_s, 3),
        "peer_samples_per_s": peer_rate,
        "mmcross_wall_s": probe_wall,
    }

    # the budgeted runs, each schedule sized to what its probe says fits: ours from the steady rates of its two
    # phases plus its start-up (a 20-step probe, its last window already half ITM, sized a 7-minute run to 4.9
    # minutes); the peer's at 90 % (at 95 %, 346 of 366 steps fitted in 15 minutes and the peer took 17.4)
    ours_steps = max(OURS_PROBE_STEPS, int(0.95 * (budget_s - STARTUP_S) / ours_step_s))
    wall = _run(_ours(work / "mmcross", ours_steps, minutes), work / "mmcross.log")
    done = _log_lines(work / "mmcross")[-1]
    result["mmcross"] = {
        "steps": done["step"],
        "max_steps": ours_steps,
        "stopped_by": done["stopped_by"],
        "wall_s": wall,
    }
    peer_steps = max(PROBE_STEPS, int(0.9 * budget_s * peer_rate / BATCH))
    _peer_csv(pairs, peer_steps * BATCH, work / "peer.csv")
    wall = _run(_peer(work, "peer", work / "peer.csv", peer_steps, precision), work / "peer.log")
    result["open_clip_train"] = {
        "steps": peer_steps,
        "wall_s": wall,
        "samples_per_s": _peer_rate(work / "peer" / "out.log"),
    }

    # both evaluated the same way, on dev
    from mmcross.factory import LAST_CHECKPOINT, checkpoint_metadata

    # re-ranked too where our run trained its head (a towers-only run, ITC alone, has none to re-rank with)
    head = checkpoint_metadata(work / "mmcross" / LAST_CHECKPOINT).get("head_trained") == "true"
    result["mmcross"]["dev"] = _eval(work, "mmcross", ["--checkpoint", str(work / "mmcross")], 32 if head else 0)
    weights = _to_safetensors(work / "peer" / "checkpoints" / "epoch_1.pt", work / "peer.safetensors")
    peer_model = ["--model", _ours_cfg().model, "--pretrained", str(weights)]
    result["open_clip_train"]["dev"] = _eval(work, "peer", peer_model, 0)
    ours, peer = result["mmcross"]["dev"]["dual_rsum"], result["open_clip_train"]["dev"]["dual_rsum"]
    result["dual_rsum_ratio"] = round(ours / peer, 3) if peer else None
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
