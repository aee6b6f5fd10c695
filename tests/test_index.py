"""Index, search and score: end to end through the CLI on the tiny preset, and the pieces against references."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from index_helpers import invoke, make_dataset

from mmcross.config import PRESET_DIR, ModelRef
from mmcross.factory import create_matcher
from mmcross.index.build import BuildOptions, build_index
from mmcross.index.search import exact_search
from mmcross.index.store import IndexStore, atomic_create_json
from mmcross.retrieval import Query, search_index


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    invoke(["index", str(dataset), "--out", str(out), "--model", "tiny", "--shard-size", "5", "-j", "0"])
    return out


@pytest.fixture(scope="module")
def tiny_matcher():
    return create_matcher("tiny")


def test_index_writes_clip_retrieval_layout_manifest_and_rejects(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["images"] == 12 and manifest["captions"] == 25 and manifest["dim"] == 128
    assert manifest["fingerprint"].startswith("sha256:") and manifest["shards"] == [0, 1, 2]
    assert (built / "img_emb" / "img_emb_0.npy").is_file() and (built / "metadata" / "metadata_2.parquet").is_file()
    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rejects] == ["gone.jpg"]
    store = IndexStore(built)
    assert store.img_emb.shape == (12, 128) and np.allclose(np.linalg.norm(store.img_emb, axis=1), 1, atol=1e-5)
    captions = store.text_metadata["caption"].to_pylist()
    assert captions[:3] == ["a red circle number 0", "picture 0 of a circle in red", "a green circle number 1"]
    assert "a caption for a missing image" in captions  # text rows keep the input order, even of a rejected image


def test_search_text_image_rerank_and_score_end_to_end(built, dataset, tmp_path, tiny_matcher):
    out = invoke(["search", str(built), "--text", "a red circle", "--k", "3", "--json"]).output
    hits = json.loads(out)["hits"]
    assert len(hits) == 3 and hits[0]["itm"] is None and hits[0]["score"] == hits[0]["itc"]
    query = tiny_matcher.encode_text("a red circle").pooled.detach().numpy()
    ranked = np.argsort(-(IndexStore(built).img_emb @ query[0]), kind="stable")[:3]
    assert [h["corpus_id"] for h in hits] == ranked.tolist()

    image = dataset / "images" / "img003.jpg"
    out = invoke(["search", str(built), "--image", str(image), "--k", "2", "--json"]).output
    assert json.loads(out)["hits"][0]["image_id"] == "img003.jpg"  # an image finds itself first

    # a random-init head re-ranks only when asked to (a test of the arithmetic, not of ranking quality)
    args = ["search", str(built), "--text", "a red circle", "--k", "3", "--rerank", "8", "--json"]
    assert "--allow-untrained-head" in invoke(args, code=2).output
    hits = json.loads(invoke([*args, "--allow-untrained-head"]).output)["hits"]
    assert all(h["itm"] is not None for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert h["score"] == pytest.approx(h["itm"] + h["itc"], abs=1e-5)
    out = invoke(
        ["search", str(built), "--image", str(image), "--target", "captions", "--rerank", "5", "--json"]
        + ["--allow-untrained-head"]
    )
    assert len(json.loads(out.output)["hits"]) == 10
    table = invoke(["search", str(built), "--text", "a blue square", "--k", "2", "--html", str(tmp_path / "h.html")])
    assert "rank" in table.output and (tmp_path / "h.html").read_text().count("<img") == 2

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "id,image,caption,note\n1,images/img000.jpg,a red circle,x\n2,images/gone.jpg,a dog,y\n"
        '3,images/img001.jpg,,z\n4,images/img002.jpg,"a blue, circle",w\n'
    )
    invoke(
        ["score", str(pairs), "--out", str(tmp_path / "s.parquet"), "--model", "tiny", "--image-root", str(dataset)]
        + ["--allow-untrained-head"]
    )
    rows = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["caption"] == "a blue, circle"
    assert rows[1]["reason"] == "image: missing file" and rows[2]["reason"] == "empty caption"
    assert rows[1]["score"] is None and rows[0]["reason"] is None
    assert rows[0]["score"] == pytest.approx(rows[0]["itm"] + rows[0]["itc"], abs=1e-6)
    with torch.inference_mode():
        from PIL import Image

        pixels = tiny_matcher.image_encoder.preprocess(Image.open(dataset / "images" / "img000.jpg").convert("RGB"))
        ref = tiny_matcher.match(pixels[None], ["a red circle"])
    assert rows[0]["itm"] == pytest.approx(float(ref.itm[0]), abs=1e-5)


def test_score_jsonl_keeps_rows_and_columns(dataset, tmp_path):
    pairs = tmp_path / "p.jsonl"
    lines = [{"image": "images/img000.jpg", "caption": "red", "k": i} for i in range(5)]
    pairs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "o.jsonl"
    invoke(["score", str(pairs), "-o", str(out), "-m", "tiny", "--image-root", str(dataset), "--batch-size", "2"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["k"] for r in rows] == list(range(5)) and all(r["itc"] is not None for r in rows)


def test_fingerprint_mismatch_is_refused_naming_both(built):
    other = create_matcher("tiny", overrides={"fusion.seed": "1"})
    with pytest.raises(ValueError, match=r"built with model tiny \(fingerprint sha256:.*query model other \(fing"):
        search_index(built, [Query(text="a cat")], ref=ModelRef(model="other"), matcher=other)
    assert "fingerprint" in invoke(["search", str(built), "--text", "x", "--model", "vit-b-32"], code=2).output


def test_exact_search_equals_brute_force():
    g = np.random.default_rng(0)
    corpus = g.standard_normal((1000, 16)).astype(np.float32)
    queries = g.standard_normal((7, 16)).astype(np.float32)
    scores, ids = exact_search(corpus, queries, 10, chunk=97)
    sims = queries @ corpus.T
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert np.array_equal(ids, ref)
    assert np.allclose(scores, np.take_along_axis(sims, ref, axis=1), atol=1e-5)


def _vectors(root):
    store = IndexStore(root)
    return store.img_emb, store.text_emb, store.metadata.to_pylist(), store.text_metadata.to_pylist()


def _assert_same_index(a, b, keys=("image_id", "path", "split", "caption")):
    va, vb = _vectors(a), _vectors(b)
    assert va[0].shape == vb[0].shape and va[1].shape == vb[1].shape
    assert np.allclose(va[0], vb[0], atol=1e-6) and np.allclose(va[1], vb[1], atol=1e-6)
    assert [{k: r[k] for k in keys if k in r} for r in va[2]] == [{k: r[k] for k in keys if k in r} for r in vb[2]]
    assert va[3] == vb[3]


def test_append_equals_full_rebuild(tmp_path, tiny_matcher):
    small, full = make_dataset(tmp_path / "small", n=6, missing=False), make_dataset(tmp_path / "full", n=10)
    opts = BuildOptions(shard_size=4, progress=False)
    build_index(full, tmp_path / "rebuilt", tiny_matcher, opts=opts)
    build_index(small, tmp_path / "grown", tiny_matcher, opts=opts)
    for name in ("img000.jpg", "img001.jpg"):  # the old images must not be re-embedded: make them unreadable
        (full / "images" / name).write_bytes(b"")
    report = build_index(
        full, tmp_path / "grown", tiny_matcher, opts=BuildOptions(shard_size=4, append=True, progress=False)
    )
    assert report.complete and report.images == 10
    _assert_same_index(tmp_path / "rebuilt", tmp_path / "grown", keys=("image_id", "caption"))
    with pytest.raises(ValueError, match="already holds an index"):
        build_index(full, tmp_path / "grown", tiny_matcher, opts=opts)

    # a damaged shard: the advice is what works for it (--resume rebuilds the last job's shards only)
    from mmcross.index.store import DamagedIndex, check_index, read_manifest

    grown = tmp_path / "grown"
    resume = BuildOptions(shard_size=4, resume=True, progress=False)
    saved = (grown / "text_tokens" / "text_mask_2.npy").read_bytes()
    (grown / "text_tokens" / "text_mask_2.npy").unlink()  # the appended shard
    with pytest.raises(DamagedIndex, match="rebuild the damaged shards with `mmcross index .* --resum"):
        check_index(grown, read_manifest(grown))
    (grown / "text_tokens" / "text_mask_2.npy").write_bytes(saved)
    (grown / "text_tokens" / "text_mask_0.npy").unlink()  # one from before --append
    with pytest.raises(DamagedIndex, match="shard 0 was built before the last --append.*in a new folder"):
        check_index(grown, read_manifest(grown))
    with pytest.raises(DamagedIndex, match="--resume cannot rebuild it: build the index again in a new folder"):
        build_index(full, grown, tiny_matcher, opts=resume)


def test_resume_rebuilds_only_missing_shards(tmp_path, tiny_matcher, dataset):
    opts = BuildOptions(shard_size=4, progress=False)
    build_index(dataset, tmp_path / "ref", tiny_matcher, opts=opts)
    build_index(dataset, tmp_path / "cut", tiny_matcher, opts=opts)
    (tmp_path / "cut" / "manifest.json").unlink()  # as if killed after shard 0, before shard 1's marker
    for n in (1, 2):
        (tmp_path / "cut" / "shards" / f"shard_{n}.json").unlink()
    (tmp_path / "cut" / "img_emb" / "img_emb_1.npy").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        IndexStore(tmp_path / "cut")
    report = build_index(dataset, tmp_path / "cut", tiny_matcher, opts=BuildOptions(shard_size=4, resume=True))
    assert report.shards_written == 2 and report.complete
    _assert_same_index(tmp_path / "ref", tmp_path / "cut")


def test_a_shards_vectors_do_not_depend_on_which_shards_a_run_builds(tmp_path, dataset, monkeypatch):
    """int8 graphs quantise activations per batch, so a vector depends on its batch: batches never span two shards,
    and a resumed build (or another rank) gives the same vectors. Here a batch-dependent encoder stands in."""
    matcher = create_matcher("tiny")
    plain = matcher.encode_image

    def batch_dependent(pixels):
        features = plain(pixels)
        features.pooled = torch.nn.functional.normalize(features.pooled + pixels.mean(), dim=-1)
        return features

    monkeypatch.setattr(matcher, "encode_image", batch_dependent)
    opts = BuildOptions(shard_size=4, batch_size=3, progress=False)
    build_index(dataset, tmp_path / "ref", matcher, opts=opts)
    build_index(dataset, tmp_path / "cut", matcher, opts=opts)
    (tmp_path / "cut" / "manifest.json").unlink()  # killed after shard 0
    for n in (1, 2):
        (tmp_path / "cut" / "shards" / f"shard_{n}.json").unlink()
    build_index(dataset, tmp_path / "cut", matcher, opts=BuildOptions(shard_size=4, batch_size=3, resume=True))
    _assert_same_index(tmp_path / "ref", tmp_path / "cut")
    assert np.array_equal(_vectors(tmp_path / "ref")[0], _vectors(tmp_path / "cut")[0])


def test_no_images_and_no_captions(tmp_path, tiny_matcher, dataset):
    build_index(dataset, tmp_path / "t", tiny_matcher, opts=BuildOptions(images=False, progress=False))
    store = IndexStore(tmp_path / "t")
    assert store.img_emb is None and store.text_emb.shape == (25, 128)
    build_index(dataset, tmp_path / "i", tiny_matcher, opts=BuildOptions(captions=False, cache_tokens=False))
    store = IndexStore(tmp_path / "i")
    assert store.text_emb is None and store.img_emb.shape == (12, 128)
    with pytest.raises(ValueError, match="no token cache"):
        search_index(tmp_path / "i", [Query(text="red")], matcher=tiny_matcher, rerank=5, allow_untrained_head=True)


def _direct_hits(dataset, matcher, caption: str, k: int, rerank: int) -> tuple[list[int], list[float]]:
    """The hits `matcher` gives in-process from the images themselves: ITC top `rerank`, then the ranking score."""
    from mmcross.data.registry import open_dataset
    from mmcross.encode import encode_records

    images = encode_records(matcher, list(open_dataset(dataset).records())).features
    itc = images.pooled @ matcher.encode_text(caption).pooled[0]  # (N,)
    top = torch.argsort(-itc, stable=True)[:rerank]
    scores = matcher.rerank(caption, images.select(top)).score
    order = torch.argsort(-scores, stable=True)[:k]
    return top[order].tolist(), scores[order].tolist()


@pytest.mark.parametrize("how", ["set", "config_file"])
def test_search_rebuilds_the_model_that_built_the_index(dataset, tmp_path, how):
    """An index built with --set (or from a JSON config file that is gone since) is searched and re-ranked without
    naming the model again, with the same hits as that matcher in-process."""
    out = tmp_path / "index"
    if how == "set":
        model_args = ["--model", "tiny", "--set", "fusion.dim=64", "--set", "fusion.heads=2"]
        matcher = create_matcher("tiny", overrides={"fusion.dim": "64", "fusion.heads": "2"})
    else:
        config = json.loads((PRESET_DIR / "tiny.json").read_text())
        config["fusion"] = {**config["fusion"], "dim": 32, "cross_layers": 1}
        path = tmp_path / "mine.json"
        path.write_text(json.dumps(config))
        model_args = ["--model", str(path)]
        matcher = create_matcher(str(path))
    invoke(["index", str(dataset), "--out", str(out), *model_args, "--shard-size", "5", "-j", "0"])
    if how == "config_file":
        path.unlink()  # the manifest holds the resolved config, not only the file's name
    rerank = ["--rerank", "8", "--json", "--allow-untrained-head"]
    hits = json.loads(invoke(["search", str(out), "--text", "a red circle", "--k", "3", *rerank]).output)
    ids, scores = _direct_hits(dataset, matcher, "a red circle", 3, 8)
    assert [h["corpus_id"] for h in hits["hits"]] == ids
    assert [h["score"] for h in hits["hits"]] == pytest.approx(scores, abs=2e-2)  # tokens are stored in float16
    # --set goes on top of the index's model: a ranking weight is accepted, another architecture is refused
    again = invoke(["search", str(out), "--text", "a red circle", "--k", "3", *rerank, "--set", "itc_weight=0"]).output
    assert all(h["score"] == pytest.approx(h["itm"]) for h in json.loads(again)["hits"])
    assert "fingerprint" in invoke(["search", str(out), "--text", "x", "--set", "fusion.dim=16"], code=2).output


def test_build_record_is_created_by_one_process_only(tmp_path):
    """Ranks started by hand create build.json exclusively: the second one finds the first one's job, whole."""
    path = tmp_path / "build.json"
    assert atomic_create_json(path, {"rank": 1}) and not atomic_create_json(path, {"rank": 0})
    assert json.loads(path.read_text()) == {"rank": 1} and list(tmp_path.iterdir()) == [path]
