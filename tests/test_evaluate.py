"""The retrieval protocol through `evaluate` against a naive loop (1, 3 and 7 captions per image); `mmcross eval`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mmcross.data.records import Record
from mmcross.evaluate import evaluate, rerank_similarity
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


class _IndexFeatures:
    """Stand-in features: `select` keeps the indices, so the stub matcher knows which pair it scores."""

    def select(self, index):
        return index


class _FixedScores:
    """A matcher whose ranking score of (image i, caption j) is read from a table."""

    def __init__(self, table):
        self.table = table

    def score_pairs(self, images, texts):
        return type("Scores", (), {"score": self.table[images, texts]})()


def test_rerank_keeps_near_ties_outside_the_top_k_apart():
    # ITC scores 6e-6 apart: pushed down by a large constant in float32 they became equal, and ties count against
    # the true match, so recall@K for K above the re-ranked k fell although the top-k set cannot change it
    torch.manual_seed(0)
    similarity = 0.3 + 6e-6 * torch.randperm(40).float().view(8, 5)  # (8 images, 5 captions), all distinct
    fusion = torch.rand(8, 5)
    for by, queries in (("column", similarity.T), ("row", similarity)):
        sim = rerank_similarity(_FixedScores(fusion), _IndexFeatures(), _IndexFeatures(), similarity, 3, by=by)
        ranked = sim.T if by == "column" else sim
        rescored = fusion.T if by == "column" else fusion
        for q in range(queries.shape[0]):
            order = torch.argsort(queries[q], descending=True).tolist()
            top, rest = order[:3], order[3:]
            by_fusion = sorted(top, key=lambda c: -float(rescored[q, c]))
            assert torch.argsort(ranked[q], descending=True)[:3].tolist() == by_fusion
            assert ranked[q, rest].unique().numel() == len(rest)  # no ties made
            assert torch.argsort(ranked[q, rest], descending=True).tolist() == list(range(len(rest)))  # ITC order
            assert ranked[q, top].min() > ranked[q, rest].max()
        _, shown = rerank_similarity(
            _FixedScores(fusion), _IndexFeatures(), _IndexFeatures(), similarity, 3, by=by, shown=True
        )
        reranked = sim != similarity  # the lifted top 3 of each query; the scores shown there are the fusion's own
        assert int(reranked.sum()) == 3 * queries.shape[0]
        assert torch.equal(shown[reranked], fusion[reranked]) and torch.equal(shown[~reranked], similarity[~reranked])


def test_failures_with_an_image_id_under_two_records(tiny_cfg, tmp_path):
    # one photo listed under two splits (two records, one id): the failure gallery took captions by id, so it fell
    # over (`eval --html`: IndexError) or paired captions with the wrong images
    for i in range(4):
        Image.new("RGB", (32, 32), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"{i}.png")
    records = [
        Record("0.png", ["red one", "red two"], path=tmp_path / "0.png"),
        Record("0.png", ["red three"], path=tmp_path / "0.png"),
        *[Record(f"{i}.png", [f"colour {i}", f"shade {i}"], path=tmp_path / f"{i}.png") for i in (1, 2, 3)],
    ]
    owner = {c: r.image_id for r in records for c in r.captions}
    result = evaluate(create_matcher(tiny_cfg), records, k=0, failures=10)
    assert result["failures"], "random init on 5 images: some true matches rank below 1"
    for failure in result["failures"]:
        if failure.direction == "text_to_image":
            assert owner[failure.query.caption] == failure.truth.image_id
        else:
            assert owner[failure.truth.caption] == failure.query.image_id
            assert all(owner[a.caption] == a.image_id for a in failure.above)
    rows = [(r.image_id, c, "test" if i == 1 else "train") for i, r in enumerate(records) for c in r.captions]
    (tmp_path / "pairs.csv").write_text("image,caption,split\n" + "".join(",".join(r) + "\n" for r in rows))
    args = ["eval", str(tmp_path / "pairs.csv"), "--split", "all", "--model", "tiny", "--rerank", "0"]
    result = CliRunner().invoke(app, [*args, "--html", str(tmp_path / "eval.html")])
    assert result.exit_code == 0, result.output
    assert "red three" in (tmp_path / "eval.html").read_text()


def test_eval_and_index_take_the_table_options(tmp_path):
    # a table whose columns no default name finds, images relative to another folder: as `data validate` reads it
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (90 * i, 60, 30)).save(pictures / f"{i}.png")
    (tmp_path / "t.csv").write_text("pic,words,split\n" + "".join(f"{i}.png,picture {i},test\n" for i in range(3)))
    table = ["--image-root", str(pictures), "--image-col", "pic", "--caption-col", "words"]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "t.csv"), "--model", "tiny", "--rerank", "0", *table])
    assert result.exit_code == 0, result.output
    assert '"images": 3' in result.output and '"captions": 3' in result.output
    built = CliRunner().invoke(app, ["index", str(tmp_path / "t.csv"), "--out", str(tmp_path / "i"), "-j", "0", *table])
    assert built.exit_code == 0, built.output
