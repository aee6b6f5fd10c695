"""webdataset tar shards (as img2dataset and `mmcross data convert --to wds` write them), streamed.

A sample is the tar members sharing a key: the image in `jpg`, `jpeg`, `png` or `webp`, captions in `txt` (one a
line) and/or `json` (`{"captions": [...]}` as mmcross writes it, or img2dataset's `{"caption": ...}`). The image
id is `json["image_id"]` when present, else the sample key; the split is `json["split"]`, else the shard name's
prefix (`train-000000.tar`). The dataset argument is a `.tar` file, a folder of them, or a brace pattern
(`shards/{000000..000099}.tar`). Unreadable shards and samples without an image become reject records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.records import SPLIT_ALIASES, ReadStats, Record, clean_caption, decode_text, normalise_split

NAME = "wds"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def is_pattern(text: str) -> bool:
    """Whether a dataset argument is a webdataset URL pattern rather than a plain path."""
    return ("{" in text and ".." in text) or "::" in text or text.startswith(("pipe:", "http://", "https://"))


def shard_urls(dataset: str) -> list[str]:
    """The shard list of a `.tar` file, a folder of shards, or a brace pattern (expanded by webdataset)."""
    path = Path(dataset)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise ValueError(f"no .tar shards in {path}")
        return shards
    if path.is_file():
        return [dataset]
    if is_pattern(dataset):
        from webdataset.shardlists import expand_urls

        return list(expand_urls(dataset))  # braces and `::` lists, as open_clip expands them
    raise FileNotFoundError(f"no such shard or folder: {dataset}")


def detect(path: Path) -> str | None:
    """Why `path` looks like webdataset shards, or None."""
    if is_pattern(str(path)) and not path.exists():
        return "a shard pattern"
    if path.is_file() and path.name.endswith(".tar"):
        return f"{path.name} is a tar shard"
    if path.is_dir() and (found := sorted(path.glob("*.tar"))):
        return f"found {len(found)} .tar shard(s) ({found[0].name}, ...)"
    return None


def _split_from_name(url: str) -> str | None:
    prefix = Path(url).name.split("-")[0].split("_")[0].lower()
    return SPLIT_ALIASES.get(prefix)


def read(path: Path | str, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records streamed from webdataset shards; the image stays encoded in `Record.data`."""
    import webdataset

    urls = shard_urls(str(path))

    def on_error(err: Exception) -> bool:
        where = next((a for a in getattr(err, "args", ()) if isinstance(a, str) and a.endswith(".tar")), str(path))
        stats.reject(where, f"unreadable shard: {type(err).__name__}: {err}", kind="record")
        return True

    samples = webdataset.WebDataset(
        urls, shardshuffle=False, handler=on_error, empty_check=False, nodesplitter=None, workersplitter=None
    )
    pending: Record | None = None
    for record in _records(samples, path, stats):
        if pending is not None and record.image_id == pending.image_id and record.data == pending.data:
            pending.captions.extend(record.captions)  # a sample per caption (convert --per-caption): merge back
            continue
        if pending is not None:
            yield pending
        pending = record
    if pending is not None:
        yield pending


def _records(samples: Iterator[dict], path: Path | str, stats: ReadStats) -> Iterator[Record]:
    for sample in samples:
        key, url = sample.get("__key__", ""), sample.get("__url__", str(path))
        shard = Path(url).name
        meta: dict = {}
        if isinstance(sample.get("json"), bytes):
            try:
                parsed = json.loads(decode_text(sample["json"], stats))
                meta = parsed if isinstance(parsed, dict) else {}
            except json.JSONDecodeError:
                stats.reject(f"{shard}#{key}", "malformed json member", kind="record")
        image_id = str(meta.get("image_id") or key)
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            members = ", ".join(k for k in sample if not k.startswith("__"))
            stats.reject(f"{shard}#{key}", f"sample has no jpg/png/webp image (members: {members})", kind="record")
            continue
        if isinstance(meta.get("captions"), list):
            texts = meta["captions"]
        elif isinstance(sample.get("txt"), bytes):
            texts = decode_text(sample["txt"], stats).replace("\r\n", "\n").split("\n")
            texts = [t for t in texts if t.strip()] or [""]
        else:
            texts = [meta["caption"]] if meta.get("caption") else []
        captions = [c for c in (clean_caption(t, stats, f"{shard}#{key}", image_id=image_id) for t in texts) if c]
        split = normalise_split(meta.get("split"), strict=False) or _split_from_name(url)
        yield Record(image_id=image_id, captions=captions, split=split, data=sample[image_key], origin=shard)
