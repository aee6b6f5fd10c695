"""Karpathy split JSON (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`).

Shape: `{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}`. Splits are
train, val (-> dev), test and restval, which is counted as train (the usual "train + restval" training set).
Images are looked up as IMAGE_ROOT/filepath/filename, then IMAGE_ROOT/filename, where IMAGE_ROOT is `--image-root`
or the first of the JSON's folder, its `images/`, `flickr30k-images/`, ... where the first images exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.records import IMAGE_DIRS, ReadStats, Record, clean_caption, decode_text, normalise_split

NAME = "karpathy"
_SPLITS = {"train": "train", "restval": "train", "val": "dev", "dev": "dev", "test": "test"}


def find_karpathy_json(folder: Path) -> Path | None:
    """A `dataset_*.json` in `folder`, or None."""
    found = sorted(folder.glob("dataset_*.json"))
    return found[0] if found else None


def sniff_json(path: Path) -> str | None:
    """ "karpathy" or "coco" from the first 64 KiB of a JSON file, or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return None
    if b'"sentences"' in head or b'"imgid"' in head:
        return "karpathy"
    if b'"annotations"' in head or b'"file_name"' in head or b'"coco_url"' in head:
        return "coco"
    return None


def detect(path: Path) -> str | None:
    """Why `path` looks like a Karpathy split JSON (or a folder with one), or None."""
    if path.is_file() and path.suffix == ".json" and (path.name.startswith("dataset_") or sniff_json(path) == NAME):
        return f"{path.name} is a Karpathy split JSON"
    if path.is_dir() and (found := find_karpathy_json(path)) is not None:
        return f"found {found.name}"
    return None


def load_json(path: Path, stats: ReadStats) -> tuple[object, bool]:
    """Parsed JSON and whether invalid UTF-8 had to be replaced (the caller counts the captions affected)."""
    before = stats.invalid_utf8
    text = decode_text(path.read_bytes(), stats)
    replaced = stats.invalid_utf8 > before
    stats.invalid_utf8 = before
    try:
        return json.loads(text), replaced
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def read_karpathy_splits(path: Path) -> dict[str, str]:
    """Split per image file name from a Karpathy JSON (restval -> train, val -> dev)."""
    data, _ = load_json(path, ReadStats())
    return {item["filename"]: _SPLITS.get(item.get("split", ""), None) for item in data.get("images", [])}


def resolve_image_root(candidates: list[Path], probes: list[str]) -> Path:
    """The first candidate folder where one of the probe relative paths exists (else the first candidate)."""
    for folder in candidates:
        if any((folder / probe).is_file() for probe in probes):
            return folder
    return candidates[0]


def read(path: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records of a Karpathy split JSON (or of the folder holding one)."""
    source = path if path.is_file() else find_karpathy_json(path)
    if source is None:
        raise ValueError(f"no Karpathy split JSON (dataset_*.json) in {path}")
    data, replaced = load_json(source, stats)
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{source} has no 'images' list: not a Karpathy split JSON")
    folder = source.parent
    relative = [str(Path(item.get("filepath", "")) / item.get("filename", "")) for item in items[:50]]
    relative += [item.get("filename", "") for item in items[:50]]
    candidates = [Path(cfg.image_root)] if cfg.image_root else [folder, *(folder / name for name in IMAGE_DIRS)]
    root = resolve_image_root(candidates, relative)
    stats.notes.append(f"images in {root}")
    if any(item.get("split") == "restval" for item in items[:1000]):
        stats.notes.append("restval images counted as train")
    for number, item in enumerate(items, start=1):
        filename = item.get("filename")
        if not filename:
            stats.reject(source, "image entry without a filename", kind="record", line=number)
            continue
        nested = root / item.get("filepath", "") / filename
        image = nested if nested.is_file() or not (root / filename).is_file() else root / filename
        captions = []
        for sentence in item.get("sentences", []):
            text = sentence.get("raw") or " ".join(sentence.get("tokens", []))
            caption = clean_caption(text, stats, source, image_id=filename)
            if caption is not None:
                captions.append(caption)
                stats.invalid_utf8 += replaced and "\ufffd" in caption
        split = item.get("split")
        yield Record(
            image_id=filename,
            captions=captions,
            split=_SPLITS.get(split) if split in _SPLITS else normalise_split(split, strict=False),
            path=image,
            origin=source.name,
            lines=[number],
        )
