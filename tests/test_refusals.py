"""What mmcross refuses, through the CLI: one `error:` line, exit 2, no traceback, finished work intact.

An untrained match head (random init) never ranks or scores silently; a checkpoint is not silently overridden by
--model or --set; bad outputs, weights files and training numbers are one-line errors.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from mmcross.factory import checkpoint_metadata, create_matcher, load_checkpoint, save_checkpoint
from tests.index_helpers import make_dataset
from tests.train_helpers import make_shapes

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _refused(args: list[str], *messages: str) -> str:
    """The one error line of a refused command, after checking it names each of `messages`."""
    result = runner.invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception), result.exception  # Exit, not a crash
    for message in messages:
        assert message in errors[0], errors[0]
    return errors[0]


def _checkpoint(path: Path, head_steps: int | None) -> Path:
    """A tiny checkpoint whose metadata says its head trained for `head_steps` (None: written before it was kept)."""
    matcher = create_matcher("tiny")
    matcher.head_steps = head_steps
    return save_checkpoint(matcher, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "trained": _checkpoint(root / "trained.safetensors", 5),
        "untrained": _checkpoint(root / "untrained.safetensors", 0),
        "legacy": _checkpoint(root / "legacy.safetensors", None),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"), n=6, missing=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=2, n_dev=4, size=32)


# ---- item 2: an untrained head --------------------------------------------------------------------------------------


def test_checkpoints_say_whether_the_head_trained_and_old_ones_count_as_trained(ckpts):
    meta = checkpoint_metadata(ckpts["trained"])
    assert (meta["head_trained"], meta["head_steps"]) == ("true", "5")
    assert checkpoint_metadata(ckpts["untrained"])["head_trained"] == "false"
    assert "head_steps" not in checkpoint_metadata(ckpts["legacy"])
    assert load_checkpoint(ckpts["legacy"]).head_trained  # written before the key existed: old runs keep working
    assert not load_checkpoint(ckpts["untrained"]).head_trained and not create_matcher("tiny").head_trained


def test_search_rerank_refuses_an_untrained_head_and_works_with_a_trained_one(dataset, ckpts, tmp_path):
    index = tmp_path / "random"
    _ok(["index", str(dataset), "--out", str(index), "--model", "tiny", "-j", "0", "--quiet"])
    assert json.loads((index / "manifest.json").read_text())["head"] == {"trained": False, "steps": 0}
    query = ["search", str(index), "--text", "a red circle", "--k", "2", "--json"]
    _refused([*query, "--rerank", "4"], "--rerank needs a trained match head", "--checkpoint", "--allow-untrained-head")
    assert json.loads(_ok(query))["hits"][0]["itm"] is None  # the dual encoder alone still answers
    assert json.loads(_ok([*query, "--rerank", "4", "--allow-untrained-head"]))["hits"][0]["itm"] is not None

    trained = tmp_path / "trained"
    _ok(["index", str(dataset), "--out", str(trained), "--checkpoint", str(ckpts["trained"]), "-j", "0", "--quiet"])
    assert json.loads((trained / "manifest.json").read_text())["head"] == {"trained": True, "steps": 5}
    hits = json.loads(_ok(["search", str(trained), "--text", "a red circle", "--rerank", "4", "--json"]))["hits"]
    assert hits and all(h["itm"] is not None for h in hits)


def test_search_refuses_what_it_would_ignore_or_drop_before_answering(dataset, ckpts, tmp_path):
    """--nprobe on an exact search, and a --queries file with a query --rerank cannot score against --target (it
    answered the queries before it, then failed and dropped them, the gallery unwritten)."""
    index = tmp_path / "idx"
    _ok(["index", str(dataset), "--out", str(index), "--checkpoint", str(ckpts["trained"]), "-j", "0", "--quiet"])
    query = ["search", str(index), "--text", "a red circle", "--k", "2"]
    _refused([*query, "--nprobe", "5"], "--nprobe tunes a faiss IVF index", "the index has no faiss index for images")
    _refused([*query, "--nprobe", "5", "--backend", "exact"], "this search is exact (--backend exact)")
    image = str(dataset / "images" / "img001.jpg")
    queries = tmp_path / "mixed.jsonl"
    queries.write_text(json.dumps({"text": "a red circle"}) + "\n" + json.dumps({"image": image}) + "\n")
    html = tmp_path / "hits.html"
    base = ["search", str(index), "--queries", str(queries), "--json", "--html", str(html)]
    _refused([*base, "--rerank", "4"], f"query 2 (image {image}) cannot be re-ranked against --target images")
    assert not html.exists()
    answered = json.loads(_ok(base))  # without --rerank both kinds search images
    assert len(answered) == 2 and all(a["hits"] for a in answered)


def test_explain_refuses_layer_beside_all_layers(dataset, tmp_path):
    image = str(dataset / "images" / "img000.jpg")
    args = ["explain", image, "a red circle", "--model", "tiny", "-o", str(tmp_path / "h.png"), "--all-layers"]
    _refused([*args, "--layer", "0"], "give one of them")
    _ok(args)


def test_eval_skips_or_refuses_rerank_with_an_untrained_head(shapes, ckpts, tmp_path):
    base = ["eval", str(shapes), "--split", "dev", "--model", "tiny"]
    _refused([*base, "--rerank", "4"], "--rerank needs a trained match head")
    out = tmp_path / "eval.json"
    _ok([*base, "--out", str(out)])  # no --rerank: the dual encoder only, and the report says why
    report = json.loads(out.read_text())
    assert report["k"] == 0 and report["rerank_metrics"] is None and report["rerank_skipped"] == "untrained head"
    assert report["head"] == {"trained": False, "steps": 0}
    _ok(["eval", str(shapes), "--split", "dev", "--checkpoint", str(ckpts["trained"]), "--out", str(out)])
    assert json.loads(out.read_text())["k"] == 16 and json.loads(out.read_text())["rerank_metrics"] is not None


def test_eval_hard_negatives_refuses_an_untrained_head(ckpts, tmp_path):
    from mmcross.data.synth import write_synth

    synth = tmp_path / "synth"
    write_synth(synth, n_images=30, seed=1, image_size=32)
    base = ["eval", str(synth), "--split", "test", "--hard-negatives", "--quiet"]
    for model in (["--model", "tiny"], ["--checkpoint", str(ckpts["untrained"])]):
        _refused([*base, *model], "--hard-negatives needs a trained match head", "--allow-untrained-head")
    out = tmp_path / "eval.json"
    _ok([*base, "--model", "tiny", "--allow-untrained-head", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["hard_negatives"]["pairs"] > 0 and report["head"] == {"trained": False, "steps": 0}
    _ok([*base, "--checkpoint", str(ckpts["trained"]), "--rerank", "0", "--out", str(out)])
    assert "hard_negative_accuracy_itm" in json.loads(out.read_text())["hard_negatives"]


def test_score_writes_itc_and_leaves_itm_empty_with_an_untrained_head(dataset, ckpts, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"image": "images/img000.jpg", "caption": "a red circle"}, {"image": "images/gone.jpg", "caption": "x"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    args = ["score", str(pairs), "-o", str(out), "--image-root", str(dataset), "--quiet"]
    assert "untrained head" in _ok([*args, "--model", "tiny"])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["itc"] is not None and scored[0]["itm"] is None and scored[0]["score"] is None
    assert scored[0]["reason"] == "untrained head" and scored[1]["reason"] == "image: missing file"
    _ok([*args, "--checkpoint", str(ckpts["legacy"])])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["itm"] is not None and scored[0]["reason"] is None


def test_explain_says_the_head_is_untrained(dataset, ckpts, tmp_path):
    image, out = str(dataset / "images" / "img000.jpg"), tmp_path / "heat.png"
    output = _ok(["explain", image, "a red circle", "--model", "tiny", "--out", str(out), "--panel", "48"])
    assert "(untrained head)" in output and "warning: untrained head" in output and out.is_file()
    output = _ok(["explain", image, "a red circle", "--checkpoint", str(ckpts["trained"]), "-o", str(out)])
    assert "untrained" not in output


# ---- item 4: --model and --set beside a checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["explain", "score", "eval", "index"])
def test_a_model_other_than_the_checkpoints_is_refused_by_every_command(command, ckpts, dataset, tmp_path):
    image = str(dataset / "images" / "img000.jpg")
    args = {
        "explain": ["explain", image, "x", "-o", str(tmp_path / "h.png")],
        "score": ["score", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "s.jsonl")],
        "eval": ["eval", str(dataset), "--split", "dev"],
        "index": ["index", str(dataset), "--out", str(tmp_path / "idx")],
    }[command]
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": image, "caption": "x"}) + "\n")
    ckpt = ["--checkpoint", str(ckpts["trained"])]
    _refused([*args, *ckpt, "--model", "vit-b-32"], "--model vit-b-32 is vit-b-32", "holds tiny", "drop --model")
    _refused([*args, *ckpt, "--set", "encoder.seed=3"], "encoder.seed would be ignored", "only itc_weight")
    assert not (tmp_path / "idx").exists() and not (tmp_path / "s.jsonl").exists()


def test_the_checkpoints_own_model_and_a_ranking_weight_are_accepted(ckpts, dataset, tmp_path):
    image, out = str(dataset / "images" / "img000.jpg"), str(tmp_path / "h.png")
    args = ["explain", image, "a red circle", "-o", out, "--checkpoint", str(ckpts["trained"]), "--model", "tiny"]
    itc, itm, score = (float(x) for x in _ok([*args, "--set", "itc_weight=0"]).split()[1:6:2])
    assert score == pytest.approx(itm, abs=1e-4) and itc != 0


# ---- item 11: one-line errors ---------------------------------------------------------------------------------------


def test_explain_out_must_be_a_png_file(dataset, tmp_path):
    image = str(dataset / "images" / "img000.jpg")
    _refused(["explain", image, "x", "-m", "tiny", "-o", str(tmp_path)], "is a folder")
    _refused(["explain", image, "x", "-m", "tiny", "-o", str(tmp_path / "heat.txt")], "must end in .png")
    assert not (tmp_path / "heat.txt").exists()


def test_explain_layer_outside_the_fusion_is_one_line(dataset, tmp_path):
    image = str(dataset / "images" / "img000.jpg")
    for layer in ("5", "-3"):  # tiny has 2 cross layers: 0, 1, -1, -2 are fine
        _refused(
            ["explain", image, "x", "-m", "tiny", "-o", str(tmp_path / "h.png"), "--layer", layer], "2 cross layers"
        )
    _ok(["explain", image, "a red circle", "-m", "tiny", "-o", str(tmp_path / "h.png"), "--layer", "-2"])


def test_captions_the_tokenizer_reads_as_nothing_are_empty_captions(dataset, ckpts, tmp_path):
    # "&nbsp;" and a BOM tokenize to start + end only: they were scored (higher than a real caption) and explained
    image = str(dataset / "images" / "img000.jpg")
    ckpt = ["--checkpoint", str(ckpts["trained"])]
    for blank in ("&nbsp;", "\ufeff", "\u200b "):
        _refused(["explain", image, blank, *ckpt, "-o", str(tmp_path / "h.png")], "empty caption")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"image": image, "caption": c}) + "\n" for c in ("&nbsp;", "a red circle")))
    _ok(["score", str(pairs), "-o", str(tmp_path / "s.jsonl"), *ckpt, "--quiet"])
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["itm"] is None) for r in scored] == [("empty caption", True), (None, False)]
    _ok(["index", str(dataset), "--out", str(tmp_path / "idx"), "-j", "0", *ckpt])
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"text": "&nbsp;"}) + "\n" + json.dumps({"text": "a red circle"}) + "\n")
    output = _ok(["search", str(tmp_path / "idx"), "--queries", str(queries), "--json", "--k", "2"])
    assert "reject: query 1 (&nbsp;): empty query caption" in output  # on stderr, before the JSON
    answered = json.loads(output[output.index("\n[") :])
    assert "empty query caption" in answered[0]["reject"] and len(answered[1]["hits"]) == 2
    queries.write_text(json.dumps({"text": "a red circle"}) + "\n" + json.dumps({"text": 5}) + "\n")
    _refused(["search", str(tmp_path / "idx"), "--queries", str(queries)], "q.jsonl:2", "must be strings")
    queries.write_text("\n \n")
    _refused(["search", str(tmp_path / "idx"), "--queries", str(queries)], "holds no query")
    lines = tmp_path / "q.txt"
    lines.write_bytes(b"a red circ\xe9le\na blue square\n")  # one bad byte: replaced, both queries answered
    answered = json.loads(_ok(["search", str(tmp_path / "idx"), "--queries", str(lines), "--json", "--k", "1"]))
    assert [a["query"] for a in answered] == ["a red circ\ufffdle", "a blue square"] and all(
        a["hits"] for a in answered
    )


def test_outputs_that_cannot_be_written_are_refused_before_the_work(dataset, tmp_path):
    # each ran the whole job, then lost it: a traceback (FileExistsError), or eval's JSON overwritten by its plot
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    image = str(dataset / "images" / "img000.jpg")
    ev = ["eval", str(dataset), "--split", "dev", "-m", "tiny", "--rerank", "0"]
    _refused([*ev, "--out", str(afile / "r.json")], "afile is a file, not a folder")
    _refused([*ev, "--html", str(afile / "r.html")], "afile is a file, not a folder")
    _refused([*ev, "--out", str(tmp_path / "r.png")], "is the JSON report")
    _refused(["explain", image, "x", "-m", "tiny", "-o", str(afile / "h.png")], "afile is a file, not a folder")
    assert afile.read_text() == "keep me" and not (tmp_path / "r.png").exists()


def test_an_unwritable_place_met_during_the_work_is_one_line(dataset, tmp_path, monkeypatch):
    import mmcross.evaluate

    def blocked(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/mmcross-cache")

    monkeypatch.setattr(mmcross.evaluate, "run_eval", blocked)
    _refused(["eval", str(dataset), "--split", "dev", "-m", "tiny"], "Permission denied", "/somewhere/mmcross-cache")


def test_index_out_that_is_a_file_is_refused(dataset, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    _refused(["index", str(dataset), "--out", str(existing), "-m", "tiny", "-j", "0"], "is a file")
    assert existing.read_text() == "keep me"


class _Payload:
    """Unpickling this would create a folder: the proof that nothing ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_bad_pretrained_files_are_one_line(ckpts, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    torch.save({"x": _Payload(marker)}, tmp_path / "evil_zip.pt")
    for path in (evil, tmp_path / "evil_zip.pt"):
        _refused(["embed", "-m", "tiny", "--pretrained", str(path), "-t", "x"], "refusing --pretrained")
    assert not marker.exists()
    _refused(
        ["embed", "-m", "tiny", "--pretrained", str(ckpts["trained"]), "-t", "x"],
        "is an mmcross checkpoint",
        "use --checkpoint",
    )
    torch.save({"other": torch.zeros(2)}, tmp_path / "other.pt")
    _refused(["embed", "-m", "tiny", "--pretrained", str(tmp_path / "other.pt"), "-t", "x"], "does not hold")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.max_steps=0", "max_steps must be at least 1"),
        ("train.max_steps=-2", "at least 1"),
        ("train.lr=-1", "lr must be positive"),
    ],
)
def test_bad_training_numbers_are_refused_up_front(shapes, tmp_path, setting, message):
    run = tmp_path / "run"
    _refused(["train", "--out", str(run), "--set", f"train.data={shapes}", "--set", setting], message)
    assert not run.exists()


# ---- item 12: say what was written ----------------------------------------------------------------------------------


def test_embed_names_the_file_it_wrote(tmp_path):
    output = _ok(["embed", "-m", "tiny", "-t", "a dog", "-o", str(tmp_path / "photos")])
    assert f"to {tmp_path / 'photos.npy'}" in output and (tmp_path / "photos.npy").is_file()


def test_resume_of_a_run_that_never_checkpointed_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "tiny"}\n')  # what a run that failed early leaves
    _refused(["train", "--out", str(run), "--resume"], "nothing to resume", "run without --resume")
    assert (run / "config.json").read_text() == '{"model": "tiny"}\n'
