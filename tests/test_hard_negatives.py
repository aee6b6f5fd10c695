"""Hard-negative evaluation on the synthetic set with the tiny preset."""

from __future__ import annotations

import pytest

from mmcross.config import DataCfg
from mmcross.data.registry import open_dataset
from mmcross.data.synth import read_holdout, read_negatives, write_synth
from mmcross.factory import create_matcher
from mmcross.hard_negatives import KINDS, hard_negative_eval


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    write_synth(out, n_images=60, seed=5, image_size=32, holdout=["blue square"])
    return out


def test_counts_and_swapping_roles_mirrors_accuracy(synth):
    matcher = create_matcher("tiny")
    records = list(open_dataset(synth, DataCfg(split="test")).records())
    negatives = read_negatives(synth)
    holdout = read_holdout(synth)
    assert holdout == ["blue square"]
    result = hard_negative_eval(matcher, records, negatives, holdout, batch_size=7)
    expected_pairs = sum(len(negatives[r.image_id]) for r in records)
    assert result["pairs"] == expected_pairs
    assert result["heldout_pairs"] == sum("blue square" in c for r in records for c in negatives[r.image_id])
    swapped = {image: {neg: cap for cap, neg in pairs.items()} for image, pairs in negatives.items()}
    mirrored = hard_negative_eval(matcher, records, swapped, holdout)
    for kind in KINDS:  # no ties with float scores: each pair is right one way round and wrong the other
        key = f"hard_negative_accuracy_{kind}"
        assert result[key] + mirrored[key] == pytest.approx(1.0)
    same = {image: {cap: cap for cap in pairs} for image, pairs in negatives.items()}
    assert all(hard_negative_eval(matcher, records, same)[f"hard_negative_accuracy_{k}"] == 0.0 for k in KINDS)


def test_dataset_without_negatives_is_a_clear_error(synth):
    records = list(open_dataset(synth, DataCfg(split="test")).records())
    with pytest.raises(ValueError, match="hard negatives"):
        hard_negative_eval(create_matcher("tiny"), records, {})


def test_eval_cli_reports_hard_negatives(synth, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "eval.json"
    args = ["eval", str(synth), "--model", "tiny", "--split", "test", "--hard-negatives", "--out", str(out)]
    args += ["--allow-untrained-head"]  # random init: the report's arithmetic is tested, not the head
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").read_text().splitlines()]
    with_negative = sum(n is not None for row in rows if row["split"] == "test" for n in row["negatives"])
    assert report["hard_negatives"]["pairs"] == with_negative  # every test caption that has a negative, once
    hard = report["hard_negatives"]
    assert "heldout_hard_negative_accuracy_score" in hard
    by_kind = hard["by_kind"]  # the synth grammar is known, so accuracies are split by what each negative changed
    assert (
        set(by_kind) <= {"colour", "attributes", "arguments"}
        and sum(v["pairs"] for v in by_kind.values()) == (hard["pairs"])
    )
    for kind in ("itc", "itm", "score"):  # the per-kind accuracies average back to the overall one
        mean = sum(v[kind] * v["pairs"] for v in by_kind.values()) / hard["pairs"]
        assert mean == pytest.approx(hard[f"hard_negative_accuracy_{kind}"])
    assert sum(v["pairs"] for v in hard["heldout_by_kind"].values()) == hard["heldout_pairs"]


def test_eval_cli_hard_negatives_of_a_dataset_without_them_fails_before_the_recall_pass(synth, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mmcross.evaluate
    from cli import app

    def no_recall_pass(*args, **kwargs):
        raise AssertionError("the recall pass ran before the negatives were read")

    monkeypatch.setattr(mmcross.evaluate, "evaluate", no_recall_pass)
    rows = [f"{r.path},{r.captions[0]},test\n" for r in open_dataset(synth, DataCfg(split="test")).records()][:3]
    (tmp_path / "pairs.csv").write_text("image,caption,split\n" + "".join(rows))
    plain = tmp_path / "plain.jsonl"  # a manifest, but no negatives in it
    plain.write_text(
        "".join(f'{{"image_id": "{i}", "image": "{r.split(",")[0]}", "captions": ["x"]}}\n' for i, r in enumerate(rows))
    )
    for dataset, message in (
        (tmp_path / "pairs.csv", "is not a JSONL manifest"),
        (plain, "no caption has a hard negative"),
    ):
        args = ["eval", str(dataset), "--model", "tiny", "--split", "all", "--hard-negatives", "--allow-untrained-head"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_negative_kind_names_what_the_negative_changed():
    from mmcross.data.synth import negative_kind

    caption = "a red circle left of a blue square"
    assert negative_kind(caption, "a blue circle left of a red square") == "attributes"
    assert negative_kind(caption, "a blue square left of a red circle") == "arguments"
    assert negative_kind("a red circle", "a green circle") == "colour"
    # one shape twice: the colour swap is the arguments swap, a question of position
    assert negative_kind("a red circle left of a blue circle", "a blue circle left of a red circle") == "arguments"
    assert negative_kind("a dog", "a cat on a mat") == "other"
