"""Flickr token layout (Flickr8k, Flickr30k): captions as lines `IMAGE.jpg#N<TAB>caption`.

Layout, as the datasets ship:

- captions: `Flickr8k.token.txt` (Flickr8k) or `results_20130124.token` (Flickr30k); lemmatised variants
  (`*.lemma.token.txt`) are ignored;
- splits: the official lists `Flickr_8k.trainImages.txt`, `...devImages.txt`, `...testImages.txt` (one file name a
  line) or, when there are none, a Karpathy JSON (`dataset_flickr30k.json`) beside the token file;
- images: `images/`, `Flicker8k_Dataset/`, `flickr30k-images/` beside the token file, or `--image-root`.

Every image named by a caption line becomes one record, with the line numbers it came from, whether or not the file
exists (validation reports the missing ones). Image files that no caption line names are listed in
`ReadStats.orphans`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.karpathy import find_karpathy_json, read_karpathy_splits
from mmcross.data.records import (
    IMAGE_DIRS,
    IMAGE_EXTENSIONS,
    ReadStats,
    Record,
    clean_caption,
    find_first,
    read_lines,
)

NAME = "flickr"
_TOKEN_PATTERNS = ("*.token.txt", "results_*.token", "*.token")
_SPLIT_LIST = re.compile(r"(train|dev|val|test)Images\.txt$", re.IGNORECASE)


def find_token_file(folder: Path) -> Path | None:
    """The caption file of a Flickr folder (lemmatised variants skipped), or None."""
    for pattern in _TOKEN_PATTERNS:
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and "lemma" not in p.name.lower())
        if found:
            return found[0]
    return None


def detect(path: Path) -> str | None:
    """Why `path` looks like a Flickr token layout, or None."""
    if path.is_file() and (path.name.endswith(".token.txt") or path.suffix == ".token"):
        return f"{path.name} is a Flickr token file"
    if path.is_dir() and (token := find_token_file(path)) is not None:
        return f"found {token.name}"
    return None


def parse_token_lines(path: Path, stats: ReadStats) -> dict[str, list[tuple[int, str]]]:
    """(line number, caption) pairs per image name, in file order; malformed lines and empty captions rejected."""
    captions: dict[str, list[tuple[int, str]]] = {}
    for number, line in read_lines(path, stats):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        image = key.strip().rsplit("#", 1)[0]
        if not sep or not image:
            stats.reject(path, "malformed line (expected IMAGE#N<TAB>caption)", kind="record", line=number)
            continue
        caption = clean_caption(text, stats, path, image_id=image, line=number)
        if caption is not None:
            captions.setdefault(image, []).append((number, caption))
        else:
            captions.setdefault(image, [])
    return captions


def read_token_file(path: str | Path) -> dict[str, list[str]]:
    """Captions per image file name, in file order; blank lines skipped, invalid UTF-8 replaced, CRLF accepted."""
    parsed = parse_token_lines(Path(path), ReadStats())
    return {image: [caption for _, caption in lines] for image, lines in parsed.items()}


def read_split_lists(folder: Path, stats: ReadStats) -> dict[str, str]:
    """Split per image name from the official `*trainImages.txt`-style lists in `folder` (empty if none)."""
    splits: dict[str, str] = {}
    used = []
    for path in sorted(folder.iterdir()):
        match = _SPLIT_LIST.search(path.name)
        if not match or not path.is_file():
            continue
        split = {"val": "dev"}.get(match.group(1).lower(), match.group(1).lower())
        used.append(path.name)
        for number, line in read_lines(path, stats):
            name = line.strip()
            if not name:
                continue
            if splits.get(name, split) != split:
                stats.reject(path, f"image listed in both {splits[name]} and {split}", image_id=name, kind="record")
            splits[name] = split
    if used:
        stats.notes.append(f"splits from {', '.join(used)}")
    return splits


def read(path: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records of a Flickr token file or of the folder holding one."""
    token = path if path.is_file() else find_token_file(path)
    if token is None:
        raise ValueError(f"no Flickr token file (*.token.txt, results_*.token) in {path}")
    folder = token.parent
    image_dir = Path(cfg.image_root) if cfg.image_root else find_first(folder, IMAGE_DIRS) or folder
    stats.notes.append(f"captions from {token.name}, images in {image_dir}")
    splits = read_split_lists(folder, stats)
    if not splits:
        karpathy = find_karpathy_json(folder)
        if karpathy is not None:
            splits = read_karpathy_splits(karpathy)
            stats.notes.append(f"splits from {karpathy.name}")
    captions = parse_token_lines(token, stats)
    if image_dir.is_dir():
        stats.orphans.extend(
            sorted(
                p.name
                for p in image_dir.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in captions and not p.name.startswith(".")
            )
        )
    for image, lines in captions.items():
        yield Record(
            image_id=image,
            captions=[caption for _, caption in lines],
            split=splits.get(image),
            path=image_dir / image,
            origin=token.name,
            lines=[number for number, _ in lines],
        )
