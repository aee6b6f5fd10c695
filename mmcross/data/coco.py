"""COCO captions JSON (`captions_train2014.json`, `captions_val2017.json`, ...) with an image folder.

Shape: `{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}`. The split comes from
the file name (train -> train, val -> dev, test -> test). Images are looked up in `--image-root`, else in the
folder named after the file's subset (`train2014/`) next to the JSON, next to its parent (the usual
`annotations/` + `train2014/` layout), or under an `images/` folder there. A folder argument reads every
`captions_*.json` in it or in its `annotations/`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.karpathy import load_json, resolve_image_root, sniff_json
from mmcross.data.records import ReadStats, Record, clean_caption

NAME = "coco"
_SUBSET = re.compile(r"captions_([a-z]+)(\d*)\.json$")


def find_caption_files(folder: Path) -> list[Path]:
    """`captions_*.json` files in `folder` or its `annotations/`."""
    return sorted(folder.glob("captions_*.json")) or sorted((folder / "annotations").glob("captions_*.json"))


def detect(path: Path) -> str | None:
    """Why `path` looks like COCO captions (a file or a folder with them), or None."""
    if path.is_file() and path.suffix == ".json" and (path.name.startswith("captions_") or sniff_json(path) == NAME):
        return f"{path.name} is a COCO captions JSON"
    if path.is_dir() and (found := find_caption_files(path)):
        return f"found {', '.join(p.name for p in found)}"
    return None


def _split_and_subset(path: Path) -> tuple[str | None, str]:
    match = _SUBSET.search(path.name)
    if not match:
        return None, path.stem
    kind = match.group(1)
    split = "train" if kind.startswith("train") else "dev" if kind.startswith("val") else "test"
    return (split if kind in ("train", "val", "test") else None), kind + match.group(2)


def read(path: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records of one COCO captions JSON or of every one in a folder."""
    files = [path] if path.is_file() else find_caption_files(path)
    if not files:
        raise ValueError(f"no COCO captions JSON (captions_*.json) in {path} or {path / 'annotations'}")
    for source in files:
        yield from _read_file(source, cfg, stats)


def _read_file(source: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    data, replaced = load_json(source, stats)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{source} has no 'images' list: not a COCO captions JSON")
    split, subset = _split_and_subset(source)
    captions: dict[object, list[str]] = {}
    for number, annotation in enumerate(data.get("annotations", []), start=1):
        image_id = annotation.get("image_id")
        caption = clean_caption(annotation.get("caption"), stats, source, image_id=str(image_id), line=number)
        if caption is not None:
            captions.setdefault(image_id, []).append(caption)
            stats.invalid_utf8 += replaced and "\ufffd" in caption
    images = data["images"]
    if cfg.image_root:
        root = Path(cfg.image_root)
    else:
        here, up = source.parent, source.parent.parent
        candidates = [here / subset, up / subset, here / "images" / subset, up / "images" / subset, here, up]
        root = resolve_image_root(candidates, [str(item.get("file_name", "")) for item in images[:50]])
    stats.notes.append(f"{source.name}: split {split or 'none'}, images in {root}")
    known = set()
    for number, item in enumerate(images, start=1):
        name = item.get("file_name")
        if not name:
            stats.reject(source, "image entry without a file_name", kind="record", line=number)
            continue
        known.add(item.get("id"))
        yield Record(
            image_id=str(name),
            captions=captions.get(item.get("id"), []),
            split=split,
            path=root / name,
            origin=source.name,
            lines=[number],
        )
    for image_id in sorted(captions.keys() - known, key=str):
        stats.reject(source, f"captions for image id {image_id}, which 'images' does not list", kind="record")
