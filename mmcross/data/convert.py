"""`mmcross data convert`: any readable dataset to a JSONL manifest, open_clip CSVs or webdataset shards.

Every image is decoded on the way (in worker processes); images that cannot be used go to `OUT/rejects.jsonl`
instead of the output. What OUT receives:

- `jsonl`: `manifest.jsonl`, one line per image: `{"image_id", "image", "captions", "split"}`. `image` is the
  absolute path of the source file; images that came as bytes (shards) are written to `OUT/images/` and named
  relative to the manifest. Every mmcross command reads it (format `table`).
- `csv`: `train.csv`, `dev.csv`, `test.csv`, `unassigned.csv` as open_clip's CSV loader reads them (TAB-separated,
  columns `filepath` and `title`, its defaults, one row per caption; an `image_id` column too, which it ignores).
- `wds`: shards `{split}-000000.tar`, ... with `shard_size` samples each, and `sizes.json` (samples per shard, which
  open_clip reads to size an epoch). A sample is the image (`jpg`, `png` or `webp`; the original bytes when they
  decode to the same RGB image everywhere, else the RGB image re-encoded), `txt` (one caption) and `json`
  (`{"image_id", "captions", "split"}`). By default a sample per image whose `txt` holds its first caption (mmcross
  reads all captions from `json`); with `per_caption`, a sample per caption (consecutive; mmcross merges them back
  into one record), so that open_clip's trainer sees every caption. Shards are written to a temporary name and
  renamed when complete.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.images import shard_payload, try_decode
from mmcross.data.parallel import imap_ordered
from mmcross.data.records import UNASSIGNED, Record, Reject, RejectLog
from mmcross.data.registry import open_dataset

TARGETS = ("jsonl", "csv", "wds")


@dataclass
class ConvertReport:
    """What `convert` wrote."""

    dataset: str
    format: str
    reason: str
    target: str
    out: str
    records: int = 0  # records read
    written: int = 0  # images written (records, or captions with per_caption)
    samples: int = 0  # lines, rows or shard samples written
    files: list[str] = field(default_factory=list)  # output files, relative to `out`
    per_split: dict[str, int] = field(default_factory=dict)  # images written per split
    rejects: int = 0
    rejects_path: str = ""
    referenced: int = 0  # jsonl / csv: images written as a path to their file, as they are (no --background)
    why_empty: str = ""  # no record at all: the split asked for, the splits the data has, and how to read them all

    @property
    def failed(self) -> bool:
        """Nothing at all could be read."""
        return self.written == 0


def _prepare(item: tuple) -> tuple:
    """Worker: decode one image; for shards also return the bytes to store. ("ok", ext, bytes) or ("reject", why)."""
    source, where, image_id, max_pixels, background, want_bytes = item
    original = source
    if want_bytes and not isinstance(source, bytes):
        try:
            original = Path(source).read_bytes()
        except OSError:
            original = source  # decode() names the reason: missing, not a file, permission denied
    result = try_decode(original, where, image_id, max_pixels=max_pixels, background=background)
    if isinstance(result, Reject):
        return ("reject", result.reason)
    if not want_bytes:
        return ("ok", None, None)
    ext, payload = shard_payload(result, original)
    return ("ok", ext, payload)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"


class _ShardWriter:
    """Tar shards of one split, rotated every `size` samples; each written under a temporary name, then renamed."""

    def __init__(self, out: Path, prefix: str, size: int, sizes: dict[str, int]):
        self.out, self.prefix, self.size, self.sizes = out, prefix, size, sizes
        self.index, self.count, self.tar, self.handle, self.name = 0, 0, None, None, ""

    def write(self, sample: dict) -> None:
        import webdataset

        if self.tar is None:
            self.name = f"{self.prefix}-{self.index:06d}.tar"
            self.handle = open(self.out / f"{self.name}.tmp", "wb")
            self.tar = webdataset.TarWriter(self.handle)
        self.tar.write(sample)
        self.count += 1
        if self.count >= self.size:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.handle.close()
        os.replace(self.out / f"{self.name}.tmp", self.out / self.name)
        self.sizes[self.name] = self.count
        self.tar, self.index, self.count = None, self.index + 1, 0


def convert(
    dataset: str | Path,
    to: str,
    out: str | Path,
    cfg: DataCfg | None = None,
    *,
    shard_size: int = 1000,
    per_caption: bool = False,
    workers: int | None = None,
) -> ConvertReport:
    """Convert `dataset` (any format mmcross reads) to `to` (jsonl, csv or wds) in the folder `out`.

    Args:
        dataset: a dataset file, folder or shard pattern.
        to: jsonl, csv or wds.
        out: output folder (created); `rejects.jsonl` is written there too.
        cfg: format, split, columns and image options of the source.
        shard_size: samples per webdataset shard.
        per_caption: webdataset only: one sample per caption instead of one per image.
        workers: decoding processes; None = one per CPU core, 0 = in this process.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; use one of {', '.join(TARGETS)}")
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    cfg = cfg or DataCfg()
    data = open_dataset(dataset, cfg)
    out = Path(out)
    stale = sorted(out.glob({"wds": "*.tar", "csv": "*.csv", "jsonl": "manifest.jsonl"}[to])) if out.is_dir() else []
    if stale:  # an earlier run's output would mix with (or, for a manifest, be overwritten by) this one's
        raise ValueError(f"{out} already holds {stale[0].name} ...: remove them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rejects = RejectLog(out)
    report = ConvertReport(str(dataset), data.format, data.reason, to, str(out), rejects_path=str(rejects.path))
    workers = (os.cpu_count() or 1) if workers is None else workers
    records: list[Record] = []

    def items():
        for record in data.records():
            records.append(record)
            source = record.data if record.data is not None else record.path
            want_bytes = to == "wds" or record.data is not None  # shard samples, or files for images given as bytes
            yield source, record.where, record.image_id, cfg.max_image_pixels, tuple(cfg.background), want_bytes
            record.data = None

    sizes: dict[str, int] = {}
    shards: dict[str, _ShardWriter] = {}
    tables: dict[str, tuple] = {}
    # written under a temporary name and renamed once whole: a run that fails half-way leaves no manifest behind
    manifest_path = out / "manifest.jsonl"
    manifest = open(manifest_path.with_suffix(".jsonl.tmp"), "w", encoding="utf-8") if to == "jsonl" else None
    done = False
    try:
        for position, result in enumerate(imap_ordered(_prepare, items(), workers)):
            record = records[position]
            records[position] = None  # type: ignore[call-overload]  # done with it
            if result[0] == "reject":
                rejects.write([Reject(record.where, result[1], image_id=record.image_id)])
                continue
            if to != "jsonl" and not record.captions:
                rejects.write([Reject(record.where, "no captions", image_id=record.image_id, kind="record")])
                continue
            split = record.split or UNASSIGNED
            if to == "wds":
                writer = shards.setdefault(split, _ShardWriter(out, split, shard_size, sizes))
                meta = {"image_id": record.image_id, "split": record.split}
                groups = [[c] for c in record.captions] if per_caption else [record.captions]
                for captions in groups:
                    sample = {"__key__": f"{report.samples:09d}", result[1]: result[2], "txt": captions[0]}
                    writer.write({**sample, "json": {**meta, "captions": captions}})
                    report.samples += 1
            else:
                image = record.path
                report.referenced += image is not None
                if image is None:  # bytes from a shard: give the image a file of its own
                    image = out / "images" / f"{report.written:09d}_{_safe_name(record.image_id)}.{result[1]}"
                    image.parent.mkdir(exist_ok=True)
                    image.write_bytes(result[2])
                if to == "jsonl":
                    name = str(image.resolve()) if record.path is not None else str(image.relative_to(out))
                    line = {
                        "image_id": record.image_id,
                        "image": name,
                        "captions": record.captions,
                        "split": record.split,
                    }
                    manifest.write(json.dumps(line, ensure_ascii=False) + "\n")
                    report.samples += 1
                else:
                    if split not in tables:
                        handle = open(out / f"{split}.csv", "w", encoding="utf-8", newline="")
                        table = csv.writer(handle, delimiter="\t", lineterminator="\n")
                        table.writerow(["filepath", "title", "image_id"])
                        tables[split] = (handle, table)
                    for caption in record.captions:
                        tables[split][1].writerow([str(image.resolve()), caption, record.image_id])
                        report.samples += 1
            report.written += 1
            report.per_split[split] = report.per_split.get(split, 0) + 1
        done = report.written > 0  # a manifest of nothing would only block the next try (--out already holds it)
    finally:
        for writer in shards.values():
            writer.close()
        for handle, _ in tables.values():
            handle.close()
        if manifest is not None:
            manifest.close()
            if done:
                Path(manifest.name).replace(manifest_path)
            else:
                Path(manifest.name).unlink(missing_ok=True)
    report.records = len(records)
    report.why_empty = "" if records else data.nothing_in_split()
    rejects.write(data.stats.rejects)
    report.rejects = rejects.count
    if to == "wds" and report.written:
        (out / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    report.files = sorted(p.name for p in out.iterdir() if p.is_file())
    return report
