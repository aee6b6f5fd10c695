"""The three attention score rules on the synthetic set: the same seeds and step budgets for each rule.

For each of 3 synthetic sets (generation seed s, a different "colour shape" held out of train and dev each) and each
rule (`fusion.score_rule`), `mmcross train --config configs/demo-synth.yaml` runs a fixed number of steps (no
`max_minutes`, so a busy machine changes the time, not the result), then `mmcross eval --hard-negatives` on the
test split. Reported per rule: held-out hard-negative accuracy of the fusion's ranking score (overall, colour,
arguments) and of the dual encoder, as mean and spread (min-max) over the seeds, and train samples/s.

With `--flickr8k-steps N` it also runs, per rule, N steps of `configs/flickr8k-scratch.yaml` (its warm-up scaled
to N/12, one dev evaluation at the end with a K=32 re-rank) and reports the dev rsum of the dual encoder and of the
re-rank, the re-rank's per-query effect and train pairs/s. These run one at a time on every thread.

Usage: python -m benchmarks.score_rules [--steps 400] [--parallel 2] [--flickr8k-steps 220] [--skip-synth]
    [--out score-rules.json]
Runs `--parallel` synthetic trainings at once, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ("scaled_dot", "additive", "concat")
SETS = {0: "red circle", 1: "blue square", 2: "green triangle"}  # generation seed -> held-out combination


def mmcross(*args: str, log: Path, threads: int | None = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode:
        raise RuntimeError(f"mmcross {' '.join(args)} failed; see {log}")


def one(work: Path, seed: int, rule: str, steps: int) -> dict:
    data, run = work / f"synth{seed}", work / f"run-{rule}-{seed}"
    mmcross(
        "train",
        "--config",
        "configs/demo-synth.yaml",
        "--out",
        str(run),
        "--no-progress",
        "--set",
        f"train.data={data}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.max_minutes=0",
        "--set",
        "train.eval_split=none",
        "--set",
        "train.threads=1",
        "--set",
        f"fusion.score_rule={rule}",
        log=work / f"train-{rule}-{seed}.log",
    )
    mmcross(
        "eval",
        str(data),
        "--split",
        "test",
        "--checkpoint",
        str(run),
        "--rerank",
        "16",
        "--hard-negatives",
        "--out",
        str(work / f"eval-{rule}-{seed}.json"),
        log=work / f"eval-{rule}-{seed}.log",
    )
    report = json.loads((work / f"eval-{rule}-{seed}.json").read_text())
    hn = report["hard_negatives"]
    log_lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    rates = [x["samples_per_s"] for x in log_lines if "samples_per_s" in x][1:]
    return {
        "seed": seed,
        "rule": rule,
        "heldout_fusion": hn["heldout_hard_negative_accuracy_score"],
        "heldout_dual": hn["heldout_hard_negative_accuracy_itc"],
        "heldout_colour_fusion": hn["heldout_by_kind"].get("colour", {}).get("score"),
        "heldout_arguments_fusion": hn["heldout_by_kind"].get("arguments", {}).get("score"),
        "rsum_dual": report["metrics"]["rsum"],
        "rsum_reranked": report["rerank_metrics"]["rsum"],
        "samples_per_s": statistics.median(rates) if rates else None,
    }


def flickr8k(work: Path, rule: str, steps: int) -> dict:
    """A short Flickr8k run of the scratch config under `rule`; dev rsum dual vs re-ranked from its final evaluation."""
    run = work / f"f8k-{rule}"
    mmcross(
        "train",
        "--config",
        "configs/flickr8k-scratch.yaml",
        "--out",
        str(run),
        "--no-progress",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"train.warmup_steps={max(1, steps // 12)}",
        "--set",
        "train.eval_every=0",  # one evaluation, at the end
        "--set",
        "train.ckpt_every=0",
        "--set",
        "train.max_minutes=0",
        "--set",
        f"fusion.score_rule={rule}",
        log=work / f"f8k-{rule}.log",
        threads=None,
    )
    log_lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    final = [x["eval"] for x in log_lines if "eval" in x][-1]
    rates = [x["samples_per_s"] for x in log_lines if "samples_per_s" in x][1:]
    dual, reranked = final["metrics"]["rsum"], final["rerank_metrics"]["rsum"]
    return {
        "rule": rule,
        "steps": steps,
        "rsum_dual": dual,
        "rsum_reranked": reranked,
        "rerank_gain": reranked / dual,
        "rerank_effect": final["rerank_effect"],
        "pairs_per_s": statistics.median(rates) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--work", default="build/score-rules")
    parser.add_argument("--out", default="score-rules.json")
    parser.add_argument("--flickr8k-steps", type=int, default=0, help="also a short Flickr8k run per rule (0: none)")
    parser.add_argument("--skip-synth", action="store_true", help="only the Flickr8k runs")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if not args.skip_synth:
        result.update(synthetic(work, args.steps, args.parallel))
    if args.flickr8k_steps:
        result["flickr8k"] = [flickr8k(work, rule, args.flickr8k_steps) for rule in RULES]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def synthetic(work: Path, steps: int, parallel: int) -> dict:
    """Every rule on every synthetic set: the runs and, per rule, mean and min-max of each figure over the sets."""
    for seed, holdout in SETS.items():
        if not (work / f"synth{seed}" / "manifest.jsonl").is_file():
            mmcross(
                "data",
                "synth",
                str(work / f"synth{seed}"),
                "--n-images",
                "4000",  # the demo's set size
                "--seed",
                str(seed),
                "--image-size",
                "48",
                "--holdout",
                holdout,
                log=work / f"synth{seed}.log",
            )
    jobs = [(seed, rule) for seed in SETS for rule in RULES]
    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(lambda job: one(work, job[0], job[1], steps), jobs))
    summary = {}
    for rule in RULES:
        mine = [r for r in runs if r["rule"] == rule]
        summary[rule] = {
            key: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
            for key in mine[0]
            if key not in ("seed", "rule") and None not in (v := [r[key] for r in mine])
        }
    return {"steps": steps, "sets": SETS, "runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
