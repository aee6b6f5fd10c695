"""A folder of images with sidecar captions: `photo.jpg` + `photo.txt` (one caption a line).

Sub-folders are walked in sorted order; hidden files and folders are skipped. An image without a sidecar is a record
with no captions (fine for indexing images). A top-level sub-folder named train, dev, val or test gives the split of
everything below it. The image id is the path relative to the folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.records import IMAGE_EXTENSIONS, SPLIT_ALIASES, ReadStats, Record, read_lines

NAME = "folder"


def _images(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(folder) / name


def detect(path: Path) -> str | None:
    """Why `path` looks like a folder of images, or None."""
    if path.is_dir():
        first = next(_images(path), None)
        if first is not None:
            return f"a folder of images ({first.relative_to(path)}, ...) with .txt sidecar captions"
    return None


def read(path: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records of the images under `path`, with captions from their sidecar `.txt` files."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    root = Path(cfg.image_root) if cfg.image_root else path
    with_captions = 0
    for image in _images(root):
        relative = image.relative_to(root)
        split = SPLIT_ALIASES.get(relative.parts[0].lower()) if len(relative.parts) > 1 else None
        sidecar = image.with_suffix(".txt")
        captions = []
        if sidecar.is_file():
            with_captions += 1
            captions = [line.strip() for _, line in read_lines(sidecar, stats) if line.strip()]
            if not captions:
                stats.reject(sidecar, "empty caption file", image_id=relative.as_posix())
        yield Record(image_id=relative.as_posix(), captions=captions, split=split, path=image, origin=root.name)
    stats.notes.append(f"{with_captions} images with a sidecar .txt")
