"""`score` reads tables as every command does: lists of captions, the CSVs `data convert` writes, invalid UTF-8."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from index_helpers import make_dataset
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), n=4)


def _invoke(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_list_of_captions_becomes_a_row_per_caption(dataset, tmp_path):
    _invoke(["data", "convert", str(dataset), "--to", "jsonl", "--out", str(tmp_path / "m"), "-j", "0"])
    manifest = tmp_path / "m" / "manifest.jsonl"
    inputs = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = tmp_path / "s.jsonl"
    result = _invoke(
        ["score", str(manifest), "-o", str(out), "-m", "tiny", "--caption-col", "captions", "--allow-untrained-head"]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [(n, caption) for n, row in enumerate(inputs, 1) for caption in row["captions"]]
    assert [(r["input_row"], r["captions"]) for r in rows] == expected  # one row per caption, none a list's text
    assert all(r["itc"] is not None and r["reason"] is None for r in rows)
    assert [r["image_id"] for r in rows] == [inputs[n - 1]["image_id"] for n, _ in expected]
    assert f"of {len(inputs)} rows as {len(expected)} pairs" in result.output
    # the columns are detected too: `captions` is a recognised caption column name
    _invoke(["score", str(manifest), "-o", str(tmp_path / "auto.jsonl"), "-m", "tiny", "--allow-untrained-head"])
    assert (tmp_path / "auto.jsonl").read_text() == out.read_text()


def test_reads_the_tab_separated_csv_that_data_convert_writes(dataset, tmp_path):
    _invoke(["data", "convert", str(dataset), "--to", "csv", "--out", str(tmp_path / "c"), "-j", "0"])
    train = tmp_path / "c" / "train.csv"
    assert "\t" in train.read_text().splitlines()[0]
    out = tmp_path / "s.parquet"
    result = _invoke(["score", str(train), "-o", str(out), "-m", "tiny"])
    assert "image column 'filepath', caption column 'title'" in result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(train.read_text().splitlines()) - 1
    assert all(r["itc"] is not None for r in rows) and rows[0]["title"].startswith("a ")


def test_invalid_utf8_is_replaced_and_counted_and_the_row_kept(dataset, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(
        b"image,caption\nimages/img000.jpg,a red circle\nimages/img001.jpg,caf\xe9 cr\xe8me\nimages/img002.jpg,blue\n"
    )
    out = tmp_path / "s.csv"
    result = runner.invoke(
        app, ["score", str(pairs), "-o", str(out), "-m", "tiny", "--image-root", str(dataset), "--allow-untrained-head"]
    )
    assert result.exit_code == 0, result.output
    assert "scored 3 of 3 rows" in result.output
    assert "1 cell(s) of invalid UTF-8 replaced by U+FFFD" in result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and "caf\ufffd cr\ufffdme" in lines[2]


def test_list_columns_are_json_in_csv_output_and_a_folder_out_is_refused_first(tmp_path):
    from mmcross.data.synth import write_synth

    write_synth(tmp_path / "synth", n_images=4, image_size=32)  # a manifest with `negatives` and `statements` lists
    manifest = tmp_path / "synth" / "manifest.jsonl"
    inputs = [json.loads(line) for line in manifest.read_text().splitlines()]
    for suffix in ("csv", "tsv"):  # pyarrow's CSV writer refused list columns: "Unsupported Type:list<item: string>"
        out = tmp_path / f"s.{suffix}"
        _invoke(["score", str(manifest), "-o", str(out), "-m", "tiny", "--allow-untrained-head"])
        rows = list(csv.DictReader(out.open(), delimiter="," if suffix == "csv" else "\t"))
        assert [json.loads(r["statements"]) for r in rows if r["input_row"] == "1"][0] == inputs[0]["statements"]
    (tmp_path / "folder.csv").mkdir()
    for args in (
        ["score", str(manifest), "-o", str(tmp_path / "folder.csv")],
        ["embed", "-t", "x", "-o", str(tmp_path)],
    ):
        refused = runner.invoke(app, [*args, "-m", "tiny"])
        assert refused.exit_code == 2 and "is a folder; give a file name" in refused.output
    assert not list(tmp_path.glob(".*.tmp"))
