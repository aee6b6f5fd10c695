"""Every reader on a tiny generated fixture, auto-detection, splits, and caption cleaning."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import image_bytes, make_coco, make_flickr, make_folder, make_karpathy, write

from mmcross.config import DataCfg
from mmcross.data.flickr import read_token_file
from mmcross.data.registry import detect_format, open_dataset


def _read(path, **cfg):
    data = open_dataset(path, DataCfg(**cfg))
    return data, list(data.records())


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_flickr_layout_with_split_lists(tmp_path):
    data, records = _read(make_flickr(tmp_path))
    assert data.format == "flickr" and "Flickr8k.token.txt" in data.reason
    by_id = {r.image_id: r for r in records}
    assert by_id["a.jpg"].captions == ["caption 0 of a.jpg", "caption 1 of a.jpg"]  # whitespace stripped
    assert {r.image_id: r.split for r in records} == {
        "a.jpg": "train", "b.jpg": "train", "c.jpg": "dev", "d.jpg": "test", "gone.jpg": None
    }  # fmt: skip
    assert by_id["gone.jpg"].lines == [9] and not by_id["gone.jpg"].path.exists()
    assert by_id["a.jpg"].path == tmp_path / "images" / "a.jpg"
    assert [r.image_id for r in _read(tmp_path, split="val")[1]] == ["c.jpg"]  # val is dev
    assert [r.image_id for r in _read(tmp_path / "Flickr8k.token.txt", split="train")[1]] == ["a.jpg", "b.jpg"]


def test_flickr_crlf_invalid_utf8_empty_and_malformed_lines(tmp_path):
    make_flickr(tmp_path, crlf=True)
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(token.read_bytes() + b"a.jpg#2\tcaf\xe9 latte\r\nb.jpg#2\t   \r\nno tab here\r\n")
    data, records = _read(tmp_path)
    a = next(r for r in records if r.image_id == "a.jpg")
    assert a.captions[-1] == "caf\ufffd latte" and all("\r" not in c for c in a.captions)
    assert data.stats.invalid_utf8 == 1
    reasons = sorted((r.reason.split(" (")[0], r.line) for r in data.stats.rejects)
    assert reasons == [("empty caption", 11), ("malformed line", 12)]
    assert read_token_file(token)["a.jpg"][-1] == "caf\ufffd latte"


def test_flickr30k_names_and_karpathy_splits(tmp_path):
    write(tmp_path / "flickr30k-images" / "1.jpg", image_bytes())
    write(tmp_path / "results_20130124.token", "1.jpg#0\tA dog .\n2.jpg#0\tA cat .\n")
    write(
        tmp_path / "dataset_flickr30k.json",
        json.dumps({"images": [{"filename": "1.jpg", "split": "test", "sentences": []}]}),
    )
    data, records = _read(tmp_path)
    assert data.format == "flickr"  # the token file wins over the Karpathy JSON, which then gives the splits
    assert [(r.image_id, r.split, r.path.parent.name) for r in records] == [
        ("1.jpg", "test", "flickr30k-images"),
        ("2.jpg", None, "flickr30k-images"),
    ]


def test_karpathy_json(tmp_path):
    data, records = _read(make_karpathy(tmp_path))
    assert data.format == "karpathy"
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        ("a.jpg", "train", ["cap 0"]), ("b.jpg", "train", ["cap 1"]), ("c.jpg", "dev", ["cap 2"]),
        ("d.jpg", "test", ["cap 3"]),
    ]  # fmt: skip
    assert all(r.path.is_file() for r in records)  # found in images/
    assert any("restval" in note for note in data.stats.notes)
    assert _read(tmp_path / "dataset_flickr8k.json", split="test")[1][0].image_id == "d.jpg"


def test_karpathy_coco_filepath(tmp_path):
    write(tmp_path / "val2014" / "x.jpg", image_bytes())
    item = {"filepath": "val2014", "filename": "x.jpg", "split": "val", "sentences": [{"raw": "a"}]}
    write(tmp_path / "dataset_coco.json", json.dumps({"images": [item]}))
    assert _read(tmp_path)[1][0].path == tmp_path / "val2014" / "x.jpg"


def test_coco_captions(tmp_path):
    data, records = _read(make_coco(tmp_path))
    assert data.format == "coco"
    assert [(r.image_id, r.split, len(r.captions)) for r in records] == [
        ("COCO_train2014_000000000001.jpg", "train", 2),
        ("COCO_train2014_000000000002.jpg", "train", 2),
        ("COCO_val2014_000000000003.jpg", "dev", 2),
    ]
    assert all(r.path.is_file() for r in records)
    single = _read(tmp_path / "annotations" / "captions_val2014.json")[1]
    assert [r.path.parent.name for r in single] == ["val2014"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_tables_pair_per_row(tmp_path, suffix):
    write(tmp_path / "imgs" / "a b.jpg", image_bytes())
    write(tmp_path / "imgs" / "c.jpg", image_bytes())
    rows = [
        ("imgs/a b.jpg", "one, with comma", "train"),
        ("imgs/a b.jpg", "two", "train"),
        ("imgs/c.jpg", "three", "val"),
    ]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        columns = list(zip(*rows))
        pq.write_table(pa.table({"image": columns[0], "caption": columns[1], "split": columns[2]}), path)
    elif suffix == ".jsonl":
        write(path, "".join(json.dumps({"image": i, "caption": c, "split": s}) + "\n" for i, c, s in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        quote = (lambda t: f'"{t}"') if sep == "," else (lambda t: t)
        write(path, f"image{sep}caption{sep}split\r\n" + "".join(f"{i}{sep}{quote(c)}{sep}{s}\r\n" for i, c, s in rows))
    data, records = _read(path)
    assert data.format == "table"
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("imgs/a b.jpg", ["one, with comma", "two"], "train"),
        ("imgs/c.jpg", ["three"], "dev"),
    ]
    assert all(r.path.is_file() for r in records)


def test_tables_lists_open_clip_columns_image_root_and_named_columns(tmp_path):
    write(tmp_path / "pics" / "a.jpg", image_bytes())
    write(tmp_path / "list.jsonl", json.dumps({"image": "a.jpg", "captions": ["x", " y ", ""]}) + "\n")
    data, records = _read(tmp_path / "list.jsonl", image_root=str(tmp_path / "pics"))
    assert records[0].captions == ["x", "y"] and records[0].path.is_file()
    assert [r.reason for r in data.stats.rejects] == ["empty caption"]
    write(tmp_path / "oc.csv", "filepath\ttitle\npics/a.jpg\tfrom open_clip\n")  # TAB-separated, as open_clip writes
    assert _read(tmp_path / "oc.csv")[1][0].captions == ["from open_clip"]
    write(tmp_path / "lists.csv", 'img_file,sents\npics/a.jpg,"[""p"", ""q""]"\n')
    records = _read(tmp_path / "lists.csv", image_col="img_file", caption_col="sents")[1]
    assert records[0].captions == ["p", "q"]
    with pytest.raises(ValueError, match="no image column"):
        _read(tmp_path / "lists.csv")
    with pytest.raises(ValueError, match="no column 'nope'"):
        _read(tmp_path / "oc.csv", caption_col="nope")
    with pytest.raises(ValueError, match="column 'filepath' cannot be both the image and the caption column"):
        _read(tmp_path / "oc.csv", caption_col="filepath")  # was: the path read as the caption


def test_table_invalid_utf8_and_bytes_images(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    data, records = _read(tmp_path / "bad.csv")
    assert records[0].captions == ["caf\ufffd"] and data.stats.invalid_utf8 == 1
    table = pa.table({"image": [{"bytes": image_bytes(), "path": "x.jpg"}], "text": ["hf style"]})
    pq.write_table(table, tmp_path / "hf.parquet")
    record = _read(tmp_path / "hf.parquet")[1][0]
    assert record.data is not None and record.image_id == "x.jpg" and record.captions == ["hf style"]
    on_disk = tmp_path / "disk.jpg"
    on_disk.write_bytes(image_bytes())
    table = pa.table({"image": [{"bytes": None, "path": str(on_disk)}], "text": ["kept on disk"]})  # HF: not embedded
    pq.write_table(table, tmp_path / "hf_files.parquet")
    data, records = _read(tmp_path / "hf_files.parquet")
    assert [(r.path, r.data, r.captions) for r in records] == [(on_disk, None, ["kept on disk"])]
    assert not data.stats.rejects


def test_a_malformed_csv_row_is_a_reject_and_the_rest_is_read(tmp_path):
    """An unquoted comma in a caption gives a row of three fields: a reject naming it, not the end of the job."""
    write(tmp_path / "pairs.csv", "image,caption\na.jpg,one\nb.jpg,a dog, running\nc.jpg,three\n")
    data, records = _read(tmp_path / "pairs.csv")
    assert [(r.image_id, r.captions) for r in records] == [("a.jpg", ["one"]), ("c.jpg", ["three"])]
    assert [r.reason for r in data.stats.rejects] == [
        "malformed row (3 fields, the header has 2): b.jpg,a dog, running"
    ]
    write(tmp_path / "twice.csv", "image,caption,caption\na.jpg,one,two\n")
    with pytest.raises(ValueError, match="names column\\(s\\) 'caption' more than once"):
        _read(tmp_path / "twice.csv")


def test_numbered_csv_rows_across_blocks_match_a_naive_reader(tmp_path):
    """`score`'s row numbers: Arrow's reader skips ragged rows, and each keeps the number a plain csv reader gives
    it, also past Arrow's 1 MiB blocks, blank lines and quoted line breaks."""
    import csv

    from mmcross.data.records import ReadStats
    from mmcross.data.table import numbered_batches

    lines = ["image,caption"]
    for i in range(30_000):  # ~1.5 MB: two of Arrow's blocks
        if i % 997 == 5:
            lines.append(f"x{i}.jpg,a dog, running {i}")  # three fields
        elif i % 1_499 == 7:
            lines.append(f'x{i}.jpg,"two\nlines {i}"')
        elif i % 2_003 == 11:
            lines.append("")
        else:
            lines.append(f"x{i}.jpg,caption number {i}")
    lines.append("last.jpg")  # a ragged row after the last good one
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "big.csv", newline="") as handle:
        rows = [fields for fields in csv.reader(handle) if fields][1:]
    expected_good = [(n, fields[1]) for n, fields in enumerate(rows, 1) if len(fields) == 2]
    expected_bad = [n for n, fields in enumerate(rows, 1) if len(fields) != 2]
    good, bad = [], []
    for batch, numbers, malformed in numbered_batches(tmp_path / "big.csv", ReadStats(), 4_096):
        good += zip(numbers, batch.column("caption").to_pylist(), strict=True)
        bad += [m.number for m in malformed]
    assert good == expected_good and bad == expected_bad and len(bad) == 32


def test_jsonl_columns_from_every_row_not_only_the_first(tmp_path):
    rows = ["", json.dumps({"image": "a.jpg", "caption": "no split given"})]  # a blank first line, then no split
    rows += [json.dumps({"image": "b.jpg", "caption": "test one", "split": "test"})]
    rows += [json.dumps({"image": "c.jpg", "caption": "train one", "split": "train", "image_id": "cee"})]
    write(tmp_path / "later.jsonl", "\n".join(rows) + "\n")
    records = _read(tmp_path / "later.jsonl", split="all")[1]
    assert sorted((r.image_id, r.split) for r in records) == [("a.jpg", None), ("b.jpg", "test"), ("cee", "train")]
    write(tmp_path / "none.jsonl", "\n[1, 2]\nnot json\n")
    with pytest.raises(ValueError, match="is a JSON object"):
        _read(tmp_path / "none.jsonl")


def test_folder_of_tables_takes_split_from_file_name(tmp_path):
    write(tmp_path / "train.csv", "filepath\ttitle\n/x/a.jpg\tone\n")
    write(tmp_path / "dev.csv", "filepath\ttitle\n/x/b.jpg\ttwo\n")
    write(tmp_path / "rejects.jsonl", '{"path": "p", "reason": "r"}\n')  # a job's own output, never data
    data, records = _read(tmp_path)
    assert data.format == "table"
    assert sorted((r.image_id, r.split) for r in records) == [("/x/a.jpg", "train"), ("/x/b.jpg", "dev")]


def test_image_folder_with_sidecars(tmp_path):
    data, records = _read(make_folder(tmp_path))
    assert data.format == "folder"
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        ("loose.webp", None, []),
        ("test/two.png", "test", ["only caption"]),
        ("train/one.jpg", "train", ["first caption", "second caption"]),
    ]


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "train-000000.tar", [
        ("k1.jpg", image_bytes()), ("k1.txt", b"first\r\nsecond\r\n"),
        ("k2.png", image_bytes(fmt="PNG")), ("k2.json", json.dumps({"caption": "img2dataset style"}).encode()),
        ("k3.txt", b"caption without image"),
    ])  # fmt: skip
    _tar(shards / "train-000001.tar", [("k4.webp", image_bytes(fmt="WEBP")), ("k4.txt", b"\xffbad byte")])
    write(shards / "broken.tar", b"not a tar" * 100)
    data, records = _read(shards)
    assert data.format == "wds"
    assert [(r.image_id, r.captions, r.split, r.data is not None) for r in records] == [
        ("k1", ["first", "second"], "train", True),
        ("k2", ["img2dataset style"], "train", True),
        ("k4", ["\ufffdbad byte"], "train", True),
    ]
    reasons = [r.reason for r in data.stats.rejects]
    assert any("no jpg/png/webp image" in r for r in reasons) and any("unreadable shard" in r for r in reasons)
    pattern = str(shards / "train-{000000..000001}.tar")
    assert detect_format(pattern)[0] == "wds"
    assert [r.image_id for r in _read(pattern)[1]] == ["k1", "k2", "k4"]
    assert [r.image_id for r in _read(shards / "train-000001.tar")[1]] == ["k4"]


def test_auto_detection_says_what_it_found(tmp_path):
    layouts = {
        "flickr": make_flickr(tmp_path / "f"),
        "karpathy": make_karpathy(tmp_path / "k"),
        "coco": make_coco(tmp_path / "c"),
        "folder": make_folder(tmp_path / "d"),
    }
    for name, path in layouts.items():
        found, reason = detect_format(path)
        assert found == name and reason
    assert detect_format(layouts["coco"] / "annotations" / "captions_train2014.json")[0] == "coco"
    renamed = tmp_path / "captions.json"  # neither name gives it away: the content does
    renamed.write_text((tmp_path / "k" / "dataset_flickr8k.json").read_text())
    assert detect_format(renamed)[0] == "karpathy"
    assert open_dataset(layouts["flickr"]).reason.startswith("auto: found Flickr8k.token.txt")
    assert open_dataset(layouts["folder"], DataCfg(format="folder")).reason == "chosen with --format"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset format"):
        open_dataset(tmp_path, DataCfg(format="xml"))
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset(layouts["flickr"], DataCfg(split="holdout"))
