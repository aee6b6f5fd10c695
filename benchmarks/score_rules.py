"""The three attention score rules on the synthetic set: the same seeds and step budgets for each rule.

For each of 3 synthetic sets (generation seed s, a different "colour shape" held out of train and dev each) and each
rule (`fusion.score_rule`), `mmcross train --config configs/demo-synth.yaml` runs a fixed number of steps (no
`max_minutes`, so a busy machine changes the time, not the result), then `mmcross eval --hard-negatives` on the
test split. Reported per rule: held-out hard-negative accuracy of the fusion's ranking score (overall, colour,
arguments) and of the dual encoder, as mean and spread (min-max) over the seeds, and train samples/s.

Usage: python -m benchmarks.score_rules [--steps 400] [--parallel 2] [--out score-rules.json]
Runs `--parallel` trainings at once, one torch thread each.
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


def mmcross(*args: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--work", default="build/score-rules")
    parser.add_argument("--out", default="score-rules.json")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for seed, holdout in SETS.items():
        if not (work / f"synth{seed}" / "manifest.jsonl").is_file():
            mmcross(
                "data",
                "synth",
                str(work / f"synth{seed}"),
                "--n-images",
                "2000",
                "--seed",
                str(seed),
                "--image-size",
                "48",
                "--holdout",
                holdout,
                log=work / f"synth{seed}.log",
            )
    jobs = [(seed, rule) for seed in SETS for rule in RULES]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: one(work, job[0], job[1], args.steps), jobs))
    summary = {}
    for rule in RULES:
        mine = [r for r in runs if r["rule"] == rule]
        summary[rule] = {
            key: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
            for key in mine[0]
            if key not in ("seed", "rule") and None not in (v := [r[key] for r in mine])
        }
    result = {"steps": args.steps, "sets": SETS, "runs": runs, "summary": summary}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
