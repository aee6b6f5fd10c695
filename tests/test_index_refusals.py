"""What `index` and `search` refuse or report instead of answering wrongly: damaged indexes, unreadable queries,
indexes read from another folder, tables that show whole paths, and jobs (resumed, or split across ranks by hand)
that would mix records or models in one index."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from index_helpers import invoke
from PIL import Image

from mmcross.factory import create_matcher, save_checkpoint
from mmcross.index.store import IndexStore

BUILD = ["--model", "tiny", "--shard-size", "5", "-j", "0"]


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "index"
    invoke(["index", dataset, "--out", out, *BUILD])
    return out


def _hits(index, *extra):
    out = invoke(["search", index, "--text", "a red circle", "--k", "50", "--json", *extra]).stdout
    return json.loads(out)["hits"]


def _same_hits(a, b):
    """Equal hits; scores within float32 noise (a shard embedded alone batches differently)."""
    strip = [{k: v for k, v in h.items() if k not in ("score", "itc")} for h in a]
    assert strip == [{k: v for k, v in h.items() if k not in ("score", "itc")} for h in b]
    assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _one_row(path):
    np.save(path, np.load(path)[:1])


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("img_emb/img_emb_1.npy", lambda p: p.unlink(), "img_emb/img_emb_1.npy is missing"),
        ("metadata/metadata_2.parquet", lambda p: p.unlink(), "metadata/metadata_2.parquet is missing"),
        ("img_emb/img_emb_2.npy", _truncate, "img_emb/img_emb_2.npy is truncated"),
        ("text_tokens/text_tokens_0.npy", _one_row, "text_tokens/text_tokens_0.npy has 1 rows, not 10"),
    ],
)
def test_damaged_index_is_refused_then_resume_rebuilds_exactly_the_damaged_shard(
    dataset, clean, tmp_path, file, damage, message
):
    index = tmp_path / "index"
    shutil.copytree(clean, index)
    damage(index / file)
    refused = invoke(["search", index, "--text", "a red circle", "--json"], code=2)
    assert message in refused.output and "--resume" in refused.output and len(refused.output.splitlines()) == 1
    shard = int(file.split("_")[-1].split(".")[0])
    repaired = invoke(["index", dataset, "--out", index, *BUILD, "--resume"]).output
    assert "wrote 1 shard(s)" in repaired and f"shard {shard} was damaged" in repaired
    _same_hits(_hits(index), _hits(clean))
    _same_hits(_hits(index, "--target", "captions"), _hits(clean, "--target", "captions"))


def test_index_works_from_another_folder(dataset, tmp_path, monkeypatch):
    """Relative dataset and checkpoint paths at build time; search --rerank and the gallery from elsewhere."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(dataset, work / "ds")
    elsewhere.mkdir()
    matcher = create_matcher("tiny")
    matcher.head_steps = 1  # stands in for a trained head: re-ranking refuses random-init heads
    save_checkpoint(matcher, work / "ckpt" / "tiny.safetensors")
    monkeypatch.chdir(work)
    invoke(["index", "ds", "--out", "idx", *BUILD, "--checkpoint", "ckpt/tiny.safetensors"])
    monkeypatch.chdir(elsewhere)
    html = elsewhere / "hits.html"
    hits = _hits(work / "idx", "--rerank", "8", "--html", html)
    assert len(hits) == 12 and all(h["itm"] is not None for h in hits)
    page = html.read_text()
    assert page.count("<img") == 12 and "no image" not in page


def test_resume_accepts_a_build_record_with_a_relative_dataset_path_from_its_folder(dataset, tmp_path, monkeypatch):
    """A job begun before paths were stored absolute (build.json holds the dataset as typed) resumes from the folder
    that path is relative to, and is then stored absolute; from another folder it names another dataset."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(dataset, work / "ds")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    invoke(["index", "ds", "--out", "idx", *BUILD])
    build = json.loads((work / "idx" / "build.json").read_text())
    assert build["dataset"] == os.path.abspath("ds")
    (work / "idx" / "build.json").write_text(json.dumps({**build, "dataset": "ds"}))  # as an older mmcross wrote it
    (work / "idx" / "img_emb" / "img_emb_1.npy").unlink()

    monkeypatch.chdir(elsewhere)  # "ds" from here is another folder
    refused = invoke(["index", work / "ds", "--out", work / "idx", *BUILD, "--resume"], code=2).output
    assert "--resume with another dataset" in refused and "the folder the job was started in" in refused
    assert json.loads((work / "idx" / "build.json").read_text())["dataset"] == "ds"  # a refusal changes nothing

    monkeypatch.chdir(work)
    repaired = invoke(["index", "ds", "--out", "idx", *BUILD, "--resume"]).output
    assert "wrote 1 shard(s)" in repaired and "shard 1 was damaged" in repaired
    for name in ("build.json", "manifest.json"):
        assert json.loads((work / "idx" / name).read_text())["dataset"] == os.path.abspath("ds")
    monkeypatch.chdir(elsewhere)  # stored absolute now: a later resume works from any folder, and so does search
    assert "wrote 0 shard(s)" in invoke(["index", work / "ds", "--out", work / "idx", *BUILD, "--resume"]).output
    assert len(_hits(work / "idx")) == 12


def test_set_index_refusal_names_the_field_that_differs(dataset, tmp_path):
    index = tmp_path / "index"
    invoke(["index", dataset, "--out", index, *BUILD, "--set", "fusion.seed=1"])
    refused = invoke(["search", index, "--text", "x", "--set", "fusion.seed=2"], code=2)
    assert "fusion.seed (index 1, query 2)" in refused.output
    assert "query model tiny" not in refused.output  # the same name twice says nothing


def test_unreadable_query_image_is_rejected_and_the_rest_answered(clean, dataset, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    lines = [
        {"text": "a red circle"},
        {"image": "missing.jpg"},
        {"image": "broken.jpg"},
        {"image": str(dataset / "images" / "img003.jpg")},
    ]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = invoke(["search", clean, "--queries", queries, "--k", "2", "--json"])
    answers = json.loads(result.stdout)
    assert [len(a["hits"]) for a in answers] == [2, 0, 0, 2] and answers[3]["hits"][0]["image_id"] == "img003.jpg"
    assert "missing.jpg" in answers[1]["reject"] and "broken.jpg" in answers[2]["reject"]
    assert "reject: query 2" in result.stderr and "reject: query 3" in result.stderr
    assert "reject" not in answers[0] and "reject: query 1" not in result.stderr
    as_text = tmp_path / "q.txt"  # JSON lines under another suffix: told by their content
    as_text.write_text(queries.read_text())
    assert json.loads(invoke(["search", clean, "--queries", as_text, "--k", "2", "--json"]).stdout) == answers
    table = invoke(["search", clean, "--queries", queries, "--k", "2", "--html", tmp_path / "q.html"])
    assert "img003.jpg" in table.stdout and "reject: query 3" in table.stderr
    assert (tmp_path / "q.html").read_text().count("not searched: ") == 2
    queries.write_text(json.dumps({"image": "missing.jpg"}) + "\n")
    nothing = invoke(["search", clean, "--queries", queries], code=1)
    assert "no query could be searched" in nothing.stderr


def test_a_caption_that_only_looks_like_json_is_a_caption(tmp_path):
    from mmcross.retrieval import Query, read_queries

    queries = tmp_path / "q.txt"
    queries.write_text('{braces} around a word\n{"caption": "not a query object"}\n')
    assert read_queries(queries) == [
        Query(text="{braces} around a word"),
        Query(text='{"caption": "not a query object"}'),
    ]


def test_search_table_shows_whole_paths_relative_to_the_dataset(tmp_path):
    folder = "holiday_pictures_from_the_summer_of_2023"
    rows = ["image,caption"]
    for i, colour in enumerate(["red", "green", "blue"]):
        name = f"{folder}/beach_sunset_with_friends_and_family_number_{i:03d}.jpg"
        (tmp_path / "ds" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "ds" / name)
        rows.append(f"{name},a long caption about a {colour} beach at sunset with friends and family at home")
    rows[1] += " [red] sign [/]"  # brackets in a caption are text, not rich markup
    (tmp_path / "ds" / "pairs.csv").write_text("\n".join(rows) + "\n")
    invoke(["index", tmp_path / "ds" / "pairs.csv", "--out", tmp_path / "index", *BUILD])
    table = invoke(["search", tmp_path / "index", "--text", "a red beach", "--k", "3"]).stdout
    for i in range(3):
        assert f"{folder}/beach_sunset_with_friends_and_family_number_{i:03d}.jpg" in table
    assert "…" not in table and str(tmp_path) not in table
    captions = invoke(["search", tmp_path / "index", "--text", "red", "--target", "captions", "--k", "3"]).stdout
    assert "…" not in captions and "number_000.jpg" in captions and "home [red] sign [/]" in captions
    brackets = invoke(["search", tmp_path / "index", "--text", "a [/] beach [bold]x[/bold]", "--k", "1"])  # was: a
    assert "a [/] beach [bold]x[/bold]" in brackets.stdout  # MarkupError traceback, and [bold] dropped in silence


def test_resume_with_another_split_or_image_root_is_refused_naming_both(dataset, tmp_path):
    """A resume reads the records again: with another split (image root, columns, reader) the shards it rebuilds
    would hold other records than those it keeps."""
    index = tmp_path / "index"
    invoke(["index", dataset, "--out", index, *BUILD, "--split", "dev"])
    (index / "manifest.json").unlink()
    (index / "shards" / "shard_1.json").unlink()  # killed before shard 1 was done
    build = (index / "build.json").read_text()
    images = str(dataset / "images")
    for other, key, values in (
        (["--split", "train"], "split", "'dev', not 'train'"),
        (["--split", "dev", "--image-root", images], "image_root", f"None, not {images!r}"),
    ):
        refused = invoke(["index", dataset, "--out", index, *BUILD, *other, "--resume"], code=2).output
        assert f"--resume with another {key}: the job in {index} has {values}" in refused
        assert len(refused.splitlines()) == 1
    assert (index / "build.json").read_text() == build and not (index / "shards" / "shard_1.json").exists()
    assert "wrote 1 shard(s)" in invoke(["index", dataset, "--out", index, *BUILD, "--split", "dev", "--resume"]).output
    assert IndexStore(index).metadata["split"].to_pylist() == ["dev"] * 6


def _rank(r: int, w: int = 2) -> list[str]:
    return ["--rank", str(r), "--world-size", str(w)]


def test_ranks_by_hand_start_in_any_order_and_refuse_another_job(dataset, clean, tmp_path):
    """Ranks started by hand cannot ask each other what they run: build.json, written by whichever starts first,
    tells the others, which refuse any difference (another model, split or number of ranks) instead of merging."""
    index = tmp_path / "index"
    first = invoke(["index", dataset, "--out", index, *BUILD, *_rank(1)]).output
    assert "rank 1/2: wrote 1 shard(s)" in first and not (index / "manifest.json").exists()
    for other, key in (
        (["--set", "encoder.seed=1", *_rank(0)], "fingerprint"),
        (["--split", "dev", *_rank(0)], "split"),
        (_rank(0, 3), "world_size"),
    ):
        refused = invoke(["index", dataset, "--out", index, *BUILD, *other], code=2).output
        assert f"holds a job with another {key}: " in refused and len(refused.splitlines()) == 1
    assert "index: 12 images" in invoke(["index", dataset, "--out", index, *BUILD, *_rank(0)]).output
    _same_hits(_hits(index), _hits(clean))


def test_a_shard_of_another_job_is_never_merged_and_resume_rebuilds_it(dataset, clean, tmp_path):
    """Ranks of two jobs starting at the same instant could both pass the build.json check: each done marker records
    its job, so the manifest is never written over shards of another model (here one copied in)."""
    index, other = tmp_path / "index", tmp_path / "other"
    invoke(["index", dataset, "--out", index, *BUILD, *_rank(0)])
    invoke(["index", dataset, "--out", other, *BUILD, "--set", "encoder.seed=1", *_rank(1)])
    for path in other.rglob("*_1.*"):  # shard 1's files and done marker
        shutil.copy(path, index / path.relative_to(other))
    refused = invoke(["index", dataset, "--out", index, *BUILD, *_rank(0), "--resume"], code=2).output
    assert "shard 1 in " in refused and "was built by another job (fingerprint 'sha256:" in refused
    assert len(refused.splitlines()) == 1 and not (index / "manifest.json").exists()
    repaired = invoke(["index", dataset, "--out", index, *BUILD, "--resume"]).output
    assert "wrote 1 shard(s)" in repaired and "shard 1 was built by another job (fingerprint" in repaired
    _same_hits(_hits(index), _hits(clean))
