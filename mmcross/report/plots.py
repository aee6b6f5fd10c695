"""Plots as PNG files: the recall@K curve of an eval report and the loss curve of a training run.

matplotlib is imported here only, lazily, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _recalls(metrics: dict[str, float], prefix: str) -> list[tuple[int, float]]:
    pattern = re.compile(re.escape(prefix) + r"_recall@(\d+)$")
    found = [(int(m.group(1)), value) for key, value in metrics.items() if (m := pattern.match(key))]
    return sorted(found)


def recall_curve(report: dict[str, Any], out: str | Path) -> Path:
    """Recall@K against K, both directions, dual encoder (dashed) and after re-ranking (solid), as a PNG.

    Args:
        report: an eval report (`mmcross.evaluate.run_eval`'s dict or its JSON file's content), with `metrics` and
            optionally `rerank_metrics` holding CLIP_benchmark keys such as `image_retrieval_recall@5`.
        out: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    curves = [("metrics", "--", "dual encoder"), ("rerank_metrics", "-", f"re-ranked top {report.get('k', '?')}")]
    for key, style, stage in curves:
        metrics = report.get(key) or {}
        for prefix, colour, direction in (
            ("image_retrieval", "tab:blue", "text->image"),
            ("text_retrieval", "tab:orange", "image->text"),
        ):
            points = _recalls(metrics, prefix)
            if points:
                ks, values = zip(*points)
                ax.plot(ks, values, style, marker="o", color=colour, label=f"{direction}, {stage}")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{Path(str(report.get('dataset', ''))).name} {report.get('split') or ''} ({report.get('model', '')})")
    ax.legend(fontsize=8, loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def loss_series(rows: list[dict]) -> tuple[list[int], dict[str, list[float]], int | None]:
    """The steps, each loss term's values (NaN where a line lacks the term: the fusion phase's have no ITC) and the
    first fusion-phase step (None without one) of a run log's loss lines; terms in order of first appearance."""
    names = ("itc", "itm", "vse")
    terms = dict.fromkeys(
        k for r in rows for k in r if k == "loss" or k.startswith("loss_") or k.endswith("_loss") or k in names
    )
    series = {term: [float(r.get(term, float("nan"))) for r in rows] for term in terms}
    fusion = next((r["step"] for r in rows if r.get("phase") == "fusion"), None)
    return [r["step"] for r in rows], series, fusion


def loss_curve(log: str | Path, out: str | Path | None = None) -> Path | None:
    """The total loss and each loss term against the optimiser step, from a run's `log.jsonl`, as a PNG.

    Args:
        log: the JSONL log `mmcross train` writes (or its run directory).
        out: the PNG to write; default `loss.png` beside the log.

    Returns:
        The PNG's path, or None when the log has no loss line yet (nothing is drawn).
    """
    log = Path(log)
    if log.is_dir():
        log = log / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"no training log {log}")
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]  # not the eval lines, nor the final {"stopped_by"} line
    if not rows:  # a run stopped (max_minutes) before its first `log_every` step: nothing to draw yet
        return None
    steps, series, fusion = loss_series(rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    marker = "o" if len(rows) < 3 else None  # one or two logged points draw no visible line
    for term, values in series.items():
        ax.plot(steps, values, linewidth=2 if term == "loss" else 1, label=term, marker=marker)
    if fusion is not None:  # the total before and after sums different terms: mark where the phase begins
        ax.axvline(fusion, color="grey", linestyle="--", linewidth=1, label="fusion phase")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"training loss ({log.parent.name})")
    if series:
        ax.legend(fontsize=8)
    out = Path(out) if out is not None else log.with_name("loss.png")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
