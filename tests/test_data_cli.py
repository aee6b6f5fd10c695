"""`mmcross data validate` and `data convert` through Typer's CliRunner, and conversions read back by every reader
(and the way open_clip's trainer reads them)."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from data_helpers import BLUE, RED, image_bytes, make_flickr, write
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mmcross.config import DataCfg
from mmcross.data.records import read_rejects
from mmcross.data.registry import open_dataset
from mmcross.data.validate import format_report, validate

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["data", *args])


def _records(path, **cfg):
    return sorted((r.image_id, r.captions, r.split) for r in open_dataset(path, DataCfg(**cfg)).records())


@pytest.fixture
def flickr(tmp_path):
    return make_flickr(tmp_path / "flickr8k")


@pytest.fixture
def messy(tmp_path):
    """A folder dataset of good and bad images, sidecar captions with problems."""
    root = tmp_path / "messy"
    rotated = Image.new("RGB", (40, 20), BLUE)
    rotated.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    rotated.save(out, format="JPEG", quality=95, exif=exif)
    write(root / "rotated.jpg", out.getvalue())
    write(root / "rotated.txt", "a sideways photo\r\n")
    write(root / "good photo é.png", image_bytes(fmt="PNG"))
    write(root / "good photo é.txt", b"caf\xe9 caption\n")
    write(root / "truncated.jpg", image_bytes(size=(64, 64))[:200])
    write(root / "truncated.txt", "never seen")
    write(root / "text.jpg", "plain text")
    write(root / "zero.png", b"")
    write(root / "blank.webp", image_bytes(fmt="WEBP"))
    write(root / "blank.txt", "   \n\n")
    return root


def test_validate_flickr_layout(flickr):
    result = run("validate", str(flickr), "--model", "none", "--workers", "0")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format    flickr (auto: found Flickr8k.token.txt)" in out
    assert "images    4 readable of 5: 1 missing, 0 unreadable" in out
    for line in ("train               2         2         4", "dev                 1         1         2"):
        assert line in out
    assert "gone.jpg  Flickr8k.token.txt line 9" in out


def test_validate_json_out_and_strict(flickr, tmp_path):
    result = run("validate", str(flickr), "--json", "--model", "none", "-j", "0", "--out", str(tmp_path / "job"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["readable"] == 4 and report["images"] == 5 and report["rejects"] == 1
    assert report["missing"] == [
        {
            "image_id": "gone.jpg",
            "path": str(flickr / "images" / "gone.jpg"),
            "origin": "Flickr8k.token.txt",
            "lines": [9],
        }
    ]
    assert report["splits"]["test"] == {"images": 1, "readable": 1, "captions": 2}
    assert read_rejects(tmp_path / "job" / "rejects.jsonl") == [
        {"path": str(flickr / "images" / "gone.jpg"), "reason": "missing file", "image_id": "gone.jpg", "kind": "image"}
    ]
    assert json.loads((tmp_path / "job" / "report.json").read_text())["readable"] == 4
    strict = run("validate", str(flickr), "--strict", "--model", "none", "-j", "0")
    assert strict.exit_code == 1
    dev_only = run("validate", str(flickr), "--split", "val", "--strict", "--model", "none", "-j", "0")
    assert dev_only.exit_code == 0 and "1 readable of 1" in dev_only.output


def test_validate_messy_folder_counts_every_problem(messy):
    report = validate(messy, model_name=None, workers=2)
    assert report.format == "folder" and report.images == 6 and report.readable == 3
    reasons = {item["image_id"]: item["reason"] for item in report.unreadable}
    assert set(reasons) == {"truncated.jpg", "text.jpg", "zero.png"}
    assert "truncated" in reasons["truncated.jpg"] and "not an image" in reasons["text.jpg"]
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert report.rotated == 1 and report.captions["invalid_utf8_replaced"] == 1
    assert report.captions["empty_rejected"] == 1 and report.without_captions == 3


def test_validate_reports_duplicate_ids_and_split_conflicts(flickr, tmp_path):
    write(flickr / "Flickr_8k.devImages.txt", "c.jpg\na.jpg\n")  # a.jpg is in train too
    report = validate(flickr, model_name=None, workers=0)
    assert [(r.reason, r.image_id) for r in report.rejects if r.kind == "record"] == [
        ("image listed in both dev and train", "a.jpg")
    ]
    write(tmp_path / "t" / "a.jpg", image_bytes())
    write(tmp_path / "t" / "pairs.csv", "image,caption,split\na.jpg,x,train\na.jpg,y,test\n")
    report = validate(tmp_path / "t", model_name=None, workers=0)
    assert report.duplicate_ids == {"a.jpg": 2} and report.images == 2
    assert "duplicate ids (1): a.jpg (x2)" in format_report(report)


def test_validate_counts_tokens_over_the_context(flickr):
    token = flickr / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "a.jpg#9\t" + " ".join(["word"] * 100) + "\n")
    report = validate(flickr, model_name="mmcross-tiny", workers=0)
    tokens = report.captions["tokens"]
    assert tokens["over_context"] == 1 and tokens["max"] == 102 and tokens["context"] == 77
    assert tokens["over_context_examples"][0]["image_id"] == "a.jpg"
    result = run("validate", str(flickr), "--model", "tiny", "-j", "0")
    assert "1 over the context of 77" in result.output


def test_validate_user_errors_and_nothing_readable(tmp_path):
    result = run("validate", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "error: no such dataset" in result.output
    result = run("validate", str(tmp_path), "--format", "xml")
    assert result.exit_code == 2 and "unknown dataset format" in result.output
    write(tmp_path / "bad" / "x.jpg", "not an image")
    result = run("validate", str(tmp_path / "bad"), "--model", "none", "-j", "0")
    assert result.exit_code == 1 and "no image could be read" in result.output
    result = run("convert", str(tmp_path / "bad"), "--to", "jsonl", "--out", str(tmp_path / "o"), "--split", "test")
    assert result.exit_code == 1 and "has no images with captions" in result.output


def test_a_split_the_data_lacks_names_the_splits_it_has_and_leaves_no_output(flickr, tmp_path):
    table = tmp_path / "nosplit.csv"
    table.write_text(f"image,caption\n{flickr / 'images' / 'a.jpg'},a caption\n")
    for args in (["validate", str(table), "--model", "none"], ["convert", str(table), "--to", "jsonl"]):
        result = run(*args, "--split", "dev", "--out", str(tmp_path / "o"), "-j", "0")
        assert result.exit_code == 1 and "in split 'dev' (it has unassigned 1); --split all reads" in result.output
    assert not (tmp_path / "o" / "manifest.jsonl").exists()  # nothing to block the next try
    assert run("convert", str(table), "--to", "jsonl", "--out", str(tmp_path / "o"), "--split", "all").exit_code == 0
    assert run("convert", str(table), "--to", "wds", "--split", "test", "--out", str(tmp_path / "w")).exit_code == 1
    assert not (tmp_path / "w" / "sizes.json").exists()


def test_convert_to_jsonl_reads_back_the_same_records(flickr, tmp_path):
    out = tmp_path / "manifest"
    result = run("convert", str(flickr), "--to", "jsonl", "--out", str(out), "-j", "0")
    assert result.exit_code == 0, result.output
    assert "wrote 4 images as 4 jsonl samples" in result.output and "1 reject(s)" in result.output
    assert _records(out / "manifest.jsonl") == [r for r in _records(flickr) if r[0] != "gone.jpg"]
    assert _records(out) == _records(out / "manifest.jsonl")  # the folder works too (rejects.jsonl is skipped)
    assert [r["image_id"] for r in read_rejects(out / "rejects.jsonl")] == ["gone.jpg"]
    strict = run("convert", str(flickr), "--to", "jsonl", "--out", str(tmp_path / "s"), "--strict", "-j", "0")
    assert strict.exit_code == 1


def test_convert_says_when_background_was_not_applied(flickr, tmp_path):
    # jsonl and csv point at the original files: a --background there changes nothing, and the user is told
    for to in ("jsonl", "csv"):
        result = run(
            "convert", str(flickr), "--to", to, "--out", str(tmp_path / to), "--background", "0,0,0", "-j", "0"
        )
        assert result.exit_code == 0 and "--background was not applied to the 4 image(s)" in result.output
    plain = run("convert", str(flickr), "--to", "jsonl", "--out", str(tmp_path / "plain"), "-j", "0")
    shards = run("convert", str(flickr), "--to", "wds", "--out", str(tmp_path / "w"), "--background", "0,0,0")
    assert "--background" not in plain.output and "--background" not in shards.output


def test_convert_to_jsonl_never_overwrites_or_leaves_half_a_manifest(flickr, tmp_path):
    out = tmp_path / "manifest"
    assert run("convert", str(flickr), "--to", "jsonl", "--out", str(out), "-j", "0").exit_code == 0
    before = (out / "manifest.jsonl").read_text()
    for source in (flickr, out):  # again into the same folder, and a manifest folder into itself (its own source)
        again = run("convert", str(source), "--to", "jsonl", "--out", str(out), "-j", "0")
        assert again.exit_code == 2 and "already holds manifest.jsonl" in again.output
        assert (out / "manifest.jsonl").read_text() == before
    table = tmp_path / "pairs.csv"
    rows = [f"{flickr / 'images' / image_id},{captions[0]}\n" for image_id, captions, _ in _records(flickr)[:2]]
    table.write_text("image,caption\n" + "".join(rows))
    failed = run("convert", str(table), "--to", "jsonl", "--out", str(tmp_path / "f"), "--caption-col", "captoin")
    assert failed.exit_code == 2 and "no column 'captoin'" in failed.output
    assert not (tmp_path / "f" / "manifest.jsonl").exists() and not list((tmp_path / "f").glob("*.tmp"))


def test_convert_to_wds_readable_by_mmcross_and_like_open_clip(flickr, tmp_path):
    out = tmp_path / "shards"
    result = run("convert", str(flickr), "--to", "wds", "--out", str(out), "--shard-size", "1", "-j", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 1, "train-000001.tar": 1, "dev-000000.tar": 1, "test-000000.tar": 1
    }  # fmt: skip
    assert not list(out.glob("*.tmp"))
    assert _records(out) == [r for r in _records(flickr) if r[0] != "gone.jpg"]
    assert _records(str(out / "train-{000000..000001}.tar")) == _records(flickr, split="train")
    again = run("convert", str(flickr), "--to", "wds", "--out", str(out))
    assert again.exit_code == 2 and "already holds dev-000000.tar" in again.output

    import webdataset as wds  # open_clip's pipeline: decode("pilrgb"), rename(image="jpg;png;jpeg;webp", text="txt")

    pipeline = wds.WebDataset(str(out / "train-{000000..000001}.tar"), shardshuffle=False, empty_check=False)
    samples = list(pipeline.decode("pilrgb").rename(image="jpg;png;jpeg;webp", text="txt"))
    assert [s["text"] for s in samples] == ["caption 0 of a.jpg", "caption 0 of b.jpg"]
    assert all(s["image"].mode == "RGB" for s in samples)


def test_convert_per_caption_merges_back(flickr, tmp_path):
    out = tmp_path / "pairs"
    result = run("convert", str(flickr), "--to", "wds", "--out", str(out), "--per-caption", "-j", "0")
    assert result.exit_code == 0 and "wrote 4 images as 8 wds samples" in result.output
    with tarfile.open(out / "train-000000.tar") as tar:
        assert sorted(m.name.split(".", 1)[1] for m in tar) == ["jpg", "jpg", "jpg", "jpg"] + ["json"] * 4 + ["txt"] * 4
    assert _records(out) == [r for r in _records(flickr) if r[0] != "gone.jpg"]


def test_convert_to_open_clip_csv(flickr, tmp_path):
    out = tmp_path / "csv"
    result = run("convert", str(flickr), "--to", "csv", "--out", str(out), "-j", "0")
    assert result.exit_code == 0, result.output
    with open(out / "train.csv", newline="") as handle:  # as open_clip's CsvDataset reads it: TAB, filepath/title
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["title"] for r in rows] == [f"caption {i} of {n}" for n in ("a.jpg", "b.jpg") for i in (0, 1)]
    assert all(Image.open(r["filepath"]).mode == "RGB" for r in rows)
    assert _records(out) == [r for r in _records(flickr) if r[0] != "gone.jpg"]


def test_convert_messy_folder_normalises_images_and_logs_rejects(messy, tmp_path):
    out = tmp_path / "clean"
    result = run("convert", str(messy), "--to", "wds", "--out", str(out), "-j", "0")
    assert result.exit_code == 0, result.output
    reasons = {}
    for reject in read_rejects(out / "rejects.jsonl"):
        reasons.setdefault(reject["image_id"], []).append(reject["reason"])
    assert "truncated" in reasons["truncated.jpg"][0] and reasons["zero.png"] == ["empty file (0 bytes)"]
    assert reasons["blank.webp"] == ["no captions", "empty caption file"] and "not an image" in reasons["text.jpg"][0]
    records = {r.image_id: r for r in open_dataset(out).records()}
    assert set(records) == {"rotated.jpg", "good photo é.png"}
    with Image.open(io.BytesIO(records["rotated.jpg"].data)) as plain:  # upright for any reader, EXIF or not
        assert plain.size == (20, 40) and np.abs(np.asarray(plain)[5, 10].astype(int) - RED).max() < 40
    back = tmp_path / "back"
    assert run("convert", str(out), "--to", "jsonl", "--out", str(back), "-j", "0").exit_code == 0
    lines = [json.loads(line) for line in (back / "manifest.jsonl").read_text().splitlines()]
    assert all(line["image"].startswith("images/") and (back / line["image"]).is_file() for line in lines)
    assert _records(back) == _records(out)


def test_convert_user_errors(flickr, tmp_path):
    result = run("convert", str(flickr), "--to", "zip", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "unknown target" in result.output
    result = run("convert", str(flickr), "--to", "wds", "--out", str(tmp_path / "o"), "--background", "red")
    assert result.exit_code == 2 and "--background expects R,G,B" in result.output


@pytest.mark.slow
def test_validate_real_flickr8k(flickr8k):
    result = run("validate", str(flickr8k), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "flickr" and report["readable"] == 7091
    assert {k: v["readable"] for k, v in report["splits"].items()} == {"train": 6000, "dev": 1000, "unassigned": 91}
    assert sorted((m["image_id"], tuple(m["lines"])) for m in report["missing"]) == [
        ("2258277193_586949ec62.jpg", (5847, 5848, 5849, 5850)),
        ("2258277193_586949ec62.jpg.1", (5846,)),
    ]
    assert report["unreadable"] == [] and report["duplicate_ids"] == {} and report["captions"]["total"] == 35460
    assert report["captions"]["tokens"]["over_context"] == 0
