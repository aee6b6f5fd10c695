"""The retrieval protocol through `evaluate` against a naive loop (1, 3 and 7 captions per image); `mmcross eval`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mmcross.data.records import Record
from mmcross.evaluate import evaluate
from mmcross.factory import create_matcher
from tests.train_helpers import make_shapes


def _naive(score, caption_image, n_images, ks=(1, 5, 10)):
    """Recall@K both ways by explicit loops; score(i, j) for image i and caption j; ties count against the truth."""
    out = {}
    n_caps = len(caption_image)
    t2i = []
    for j in range(n_caps):
        true = score(caption_image[j], j)
        t2i.append(1 + sum(1 for i in range(n_images) if i != caption_image[j] and score(i, j) >= true))
    i2t = []
    for i in range(n_images):
        own = [j for j in range(n_caps) if caption_image[j] == i]
        best = max(score(i, j) for j in own)
        i2t.append(1 + sum(1 for j in range(n_caps) if j not in own and score(i, j) >= best))
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r <= k for r in t2i) / n_caps
        out[f"text_retrieval_recall@{k}"] = sum(r <= k for r in i2t) / n_images
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """7 images with 1, 3 and 7 captions (the protocol never assumes five)."""
    root = tmp_path_factory.mktemp("uneven")
    records = []
    for i in range(7):
        path = root / f"{i}.png"
        Image.new("RGB", (64, 64), (30 * i, 255 - 30 * i, (90 * i) % 255)).save(path)
        n = (1, 3, 7)[i % 3]
        records.append(Record(f"{i}.png", [f"picture {i} caption {c} {'x' * c}" for c in range(n)], path=path))
    return records


def test_evaluate_matches_naive_loop(tiny_cfg, uneven):
    matcher = create_matcher(tiny_cfg)
    result = evaluate(matcher, uneven, k=7)  # k = all images: re-ranked = ranking every pair by the fusion score
    captions = [c for r in uneven for c in r.captions]
    caption_image = [i for i, r in enumerate(uneven) for _ in r.captions]
    assert result["images"] == 7 and result["captions"] == len(captions) == 1 + 3 + 7 + 1 + 3 + 7 + 1
    pixels = torch.stack([matcher.image_encoder.preprocess(Image.open(r.path).convert("RGB")) for r in uneven])
    with torch.no_grad():
        itc = matcher.encode_image(pixels).pooled @ matcher.encode_text(captions).pooled.T
        full = torch.stack(
            [matcher.match(pixels[i : i + 1].expand(len(captions), -1, -1, -1), captions).score for i in range(7)]
        )
    for key, value in _naive(lambda i, j: float(itc[i, j]), caption_image, 7).items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # t2i re-ranks each caption's 7 images = all; i2t re-ranks each image's top 7 of 23 captions only
    naive_full = _naive(lambda i, j: float(full[i, j]), caption_image, 7)
    for key, value in naive_full.items():
        if key.startswith("image_"):
            assert result["rerank_metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert result["rerank_metrics"]["rsum"] == pytest.approx(
        100 * sum(v for k, v in result["rerank_metrics"].items() if "recall@" in k)
    )


def test_eval_cli_writes_clip_benchmark_json(tmp_path):
    manifest = make_shapes(tmp_path / "data", n_train=2, n_dev=6)
    out = tmp_path / "results.json"
    res = CliRunner().invoke(
        app,
        ["eval", str(manifest), "--split", "dev", "--model", "tiny", "--rerank", "4", "--out", str(out)]
        + ["--allow-untrained-head"],  # random init: the test is of the protocol, not of a trained head
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert {"metrics", "rerank_metrics", "dataset", "split", "model", "k"} <= set(report)
    assert report["split"] == "dev" and report["k"] == 4 and report["model"] == "tiny" and report["images"] == 6
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@10"):
        assert 0 <= report["metrics"][key] <= 1 and 0 <= report["rerank_metrics"][key] <= 1
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--model", "tiny"])
    assert bad.exit_code == 2 and "error:" in bad.output
