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
    assert f"of {len(expected)} pairs from {len(inputs)} input rows" in result.output
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
    assert "scored 3 of 3 pairs ->" in result.output
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


def _red_png(path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 20, 20)).save(path)
    return path


def test_jsonl_rows_keep_every_key_and_number_whatever_the_batch(tmp_path):
    """Keys only some lines have, ints beside floats, strings beside lists, malformed lines: one schema for the whole
    file, every row in order with its line as input_row, the same output at any --batch-size."""
    _red_png(tmp_path / "a.png")
    lines = [
        '{"image": "a.png", "caption": "a red square"}',
        '{"image": "a.png", "caption": "two", "note": "hello", "weight": 1}',
        "{broken",
        "",
        "[1, 2]",
        '{"image": " a.png ", "note": "x", "caption": ["three", "four"], "weight": 2.5}',
        '{"image": "a.png", "weight": 3}',
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    outputs = {}
    for out_name, batch in (("b1.csv", "1"), ("b2.csv", "2"), ("b64.csv", "64"), ("b2.parquet", "2")):
        result = runner.invoke(
            app, ["score", str(pairs), "-o", str(tmp_path / out_name), "-m", "tiny", "--batch-size", batch]
        )
        assert result.exit_code == 0, result.output
        outputs[out_name] = tmp_path / out_name
    assert (
        "pairs.jsonl:3: malformed JSON line" in result.output
        and "pairs.jsonl:5: JSON line is not an object" in result.output
    )
    runs = {
        name: list(csv.DictReader(path.read_text().splitlines())) for name, path in outputs.items() if ".csv" in name
    }
    for other in (runs["b1.csv"], runs["b64.csv"]):  # the same rows; itc to float precision (batched differently)
        assert [{k: v for k, v in r.items() if k != "itc"} for r in other] == [
            {k: v for k, v in r.items() if k != "itc"} for r in runs["b2.csv"]
        ]
        assert [float(r["itc"] or 0) for r in other] == pytest.approx(
            [float(r["itc"] or 0) for r in runs["b2.csv"]], abs=1e-5
        )
    rows = runs["b2.csv"]
    assert list(rows[0]) == ["image", "caption", "note", "weight", "input_row", "itc", "itm", "score", "reason"]
    assert [r["input_row"] for r in rows] == ["1", "2", "3", "5", "6", "6", "7"]
    assert rows[1]["note"] == "hello" and rows[1]["weight"] == "1"  # not lost, one type for the column
    assert rows[2]["reason"].startswith("malformed JSON line") and rows[2]["image"] == ""
    assert [r["caption"] for r in rows[4:6]] == ["three", "four"] and all(r["itc"] for r in rows[4:6])  # path stripped
    assert rows[6]["reason"] == "empty caption"
    table = pq.read_table(outputs["b2.parquet"])
    assert table.column("weight").type == "double" and table.column("input_row").to_pylist() == [1, 2, 3, 5, 6, 6, 7]


def test_one_column_for_both_image_and_caption_is_refused(tmp_path):
    _red_png(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,one\n")
    args = ["score", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "s.csv"), "-m", "tiny"]
    result = runner.invoke(app, [*args, "--image-col", "image", "--caption-col", "image"])
    assert result.exit_code == 2 and "cannot be both the image and the caption column" in result.output
    assert not (tmp_path / "s.csv").exists()


def test_a_malformed_csv_row_is_a_row_with_its_reason_not_the_end_of_the_job(tmp_path):
    _red_png(tmp_path / "a.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('image,caption\na.png,one\na.png,a dog, running\na.png,"multi\nline"\n\na.png,four\na.png,x,y,z\n')
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["score", str(pairs), "-o", str(out), "-m", "tiny", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["input_row"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["caption"] for r in rows] == ["one", "", "multi\nline", "four", ""]
    assert rows[1]["reason"] == "malformed row (3 fields, the header has 2)" and rows[1]["itc"] == ""
    assert rows[4]["reason"] == "malformed row (4 fields, the header has 2)"
    assert all(rows[i]["itc"] for i in (0, 2, 3))
    assert "malformed row (3 fields, the header has 2): a.png,a dog, running" in result.output
    pairs.write_text("image,caption\n" + "".join(f"a.png,dog, {i}\n" for i in range(25)))  # a comma in each
    many = runner.invoke(app, ["score", str(pairs), "-o", str(out), "-m", "tiny"])
    assert many.exit_code == 0 and many.output.count(": malformed row (") == 10, many.output  # ten, then a count
    assert f"note: 15 more malformed row(s), each in {out} with its input_row and reason" in many.output


def test_parquet_image_bytes_and_structs_are_scored_and_written_as_text_to_csv(tmp_path):
    import base64

    import pyarrow as pa

    png = _red_png(tmp_path / "a.png").read_bytes()
    table = pa.table(
        {
            "image": [{"bytes": png, "path": "x.png"}, {"bytes": None, "path": "a.png"}],
            "raw": [png, png],
            "caption": ["red", "green"],
        }
    )
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(table, pairs)
    for name in ("s.csv", "s.jsonl", "s.parquet"):
        result = runner.invoke(app, ["score", str(pairs), "-o", str(tmp_path / name), "-m", "tiny"])
        assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))
    assert all(r["itc"] and r["reason"] == "untrained head" for r in rows)
    assert base64.b64decode(rows[0]["raw"]) == png and json.loads(rows[1]["image"]) == {"bytes": None, "path": "a.png"}
    jsonl = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert base64.b64decode(jsonl[0]["image"]["bytes"]) == png
    assert pq.read_table(tmp_path / "s.parquet").column("raw").to_pylist() == [png, png]
    # a bytes cell scores as its image: the same itc as the file it was read from
    by_path = tmp_path / "p.csv"
    by_path.write_text("image,caption\na.png,red\n")
    _invoke(["score", str(by_path), "-o", str(tmp_path / "p.jsonl"), "-m", "tiny"])
    assert json.loads((tmp_path / "p.jsonl").read_text())["itc"] == pytest.approx(jsonl[0]["itc"], abs=1e-6)


def test_a_column_named_twice_is_one_clear_error(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption,caption\na.png,one,two\n")
    result = runner.invoke(app, ["score", str(pairs), "-o", str(tmp_path / "s.csv"), "-m", "tiny"])
    assert result.exit_code == 2 and "names column(s) 'caption' more than once" in result.output


def test_captions_longer_than_the_context_are_said_to_be_cut(tmp_path):
    _red_png(tmp_path / "a.png")
    long = " ".join(["dog"] * 100)  # 102 tokens with start and end; tiny's context is 77
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,caption\na.png,{long}\na.png,a short one\n")
    result = _invoke(["score", str(pairs), "-o", str(tmp_path / "s.csv"), "-m", "tiny", "--quiet"])
    assert "1 caption(s) longer than the model's 77 tokens were scored on the part that fits" in result.output
    out = tmp_path / "h.png"
    result = _invoke(["explain", str(tmp_path / "a.png"), long, "-m", "tiny", "-o", str(out), "--panel", "32"])
    assert "the caption is longer than the model's 77 tokens" in result.output
    result = _invoke(["explain", str(tmp_path / "a.png"), "a short one", "-m", "tiny", "-o", str(out), "--panel", "32"])
    assert "longer than" not in result.output
