"""Plots (recall@K curve, loss curve) and `eval --out/--html` on the tiny preset."""

from __future__ import annotations

import json
import re

from PIL import Image
from train_helpers import make_shapes
from typer.testing import CliRunner

from cli import app
from mmcross.report.plots import loss_curve, loss_series, recall_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with Image.open(path) as png:
        return path.read_bytes()[:8] == PNG_MAGIC and png.format == "PNG" and png.size == (600, 400)


def test_recall_curve_png(tmp_path):
    report = {
        "dataset": "d",
        "split": "test",
        "model": "tiny",
        "k": 4,
        "metrics": {"image_retrieval_recall@1": 0.1, "image_retrieval_recall@5": 0.4, "text_retrieval_recall@1": 0.2},
        "rerank_metrics": {"image_retrieval_recall@1": 0.3, "rsum": 30.0},
    }
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = recall_curve(report, Path(tmp) / "r.png")
        assert _is_png(out)


def test_loss_curve_png_from_jsonl(tmp_path):
    lines = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "itc": 1.0 / s, "itm": 0.7, "lr": 1e-4} for s in range(1, 6)]
    lines.insert(3, {"step": 3, "eval": {"metrics": {}}})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = loss_curve(tmp_path)
    assert out == tmp_path / "loss.png" and _is_png(out)


def test_loss_series_keeps_every_term_and_marks_the_fusion_phase():
    # the curve took its terms from the last line only: a fusion phase (ITM alone) dropped the towers' ITC
    rows = [{"step": s, "loss": 3.0 / s, "itc": 3.0 / s} for s in (1, 2)]
    rows += [{"step": s, "phase": "fusion", "loss": 0.6, "itm": 0.6} for s in (3, 4)]
    steps, series, fusion = loss_series(rows)
    assert steps == [1, 2, 3, 4] and list(series) == ["loss", "itc", "itm"] and fusion == 3
    assert series["itc"][:2] == [3.0, 1.5] and all(v != v for v in series["itc"][2:])  # NaN: a gap, not a zero
    assert loss_series(rows[:2])[2] is None


def test_eval_writes_recall_curve_and_failures_gallery(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", n_train=2, n_dev=6, size=32)
    out, html = tmp_path / "eval" / "results.json", tmp_path / "fail.html"
    args = ["eval", str(manifest), "--split", "dev", "--model", "tiny", "-k", "3", "--out", str(out)]
    args += ["--allow-untrained-head"]  # random init: the re-ranked order is only drawn
    result = CliRunner().invoke(app, [*args, "--html", str(html)])
    assert result.exit_code == 0, result.output
    assert "failures" not in json.loads(out.read_text())
    assert _is_png(out.with_suffix(".png"))
    page = html.read_text(encoding="utf-8")
    ranks = [int(r) for r in re.findall(r'class="failure" data-rank="(\d+)"', page)]
    assert ranks and all(r > 1 for r in ranks) and "data:image/jpeg;base64," in page and "<script" not in page
