"""The reader registry: `--format` picks a reader; `auto` detects the layout and says which it chose.

Each reader is a small module with `NAME`, `detect(path) -> reason | None` and
`read(path, DataCfg, ReadStats) -> Iterator[Record]`. Auto-detection tries them in `DETECT_ORDER`: the most
specific layouts first, a plain folder of images last (a Flickr folder also holds images, and a Flickr30k folder
may hold the Karpathy JSON that gives its splits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from mmcross.config import DataCfg
from mmcross.data import coco, flickr, folder, karpathy, table, wds
from mmcross.data.records import ALL, UNASSIGNED, ReadStats, Record, normalise_split

READERS: dict[str, ModuleType] = {m.NAME: m for m in (flickr, karpathy, coco, table, folder, wds)}
DETECT_ORDER = ("wds", "flickr", "karpathy", "coco", "table", "folder")
FORMATS = ("auto", *READERS)


def detect_format(path: str | Path) -> tuple[str, str]:
    """(format name, why) for a dataset path; ValueError when no reader recognises it."""
    path = Path(path)
    if not path.exists() and not wds.is_pattern(str(path)):
        raise FileNotFoundError(f"no such dataset: {path}")
    for name in DETECT_ORDER:
        reason = READERS[name].detect(path)
        if reason:
            return name, reason
    raise ValueError(
        f"cannot tell the format of {path}: not a Flickr token file, Karpathy or COCO JSON, table, "
        f"folder of images or webdataset shards; pass --format ({', '.join(READERS)})"
    )


@dataclass
class Dataset:
    """A dataset opened with one reader; iterate `records()` (once per pass), read `stats` after a pass."""

    path: str  # what the user named: a file, a folder or a shard pattern
    format: str  # the reader's name
    reason: str  # why this reader: "chosen with --format" or what auto-detection found
    cfg: DataCfg
    stats: ReadStats = field(default_factory=ReadStats)
    splits: Counter = field(default_factory=Counter)  # records with captions per split seen by the last pass

    def records(self) -> Iterator[Record]:
        """The records of the chosen split (all records when no split is set), streamed from the reader."""
        self.stats, self.splits = ReadStats(), Counter()
        split = normalise_split(self.cfg.split)
        source = self.path if self.format == "wds" else Path(self.path)
        for record in READERS[self.format].read(source, self.cfg, self.stats):
            if record.captions:
                self.splits[record.split or UNASSIGNED] += 1
            if split is None or record.split == split:
                yield record

    def nothing_in_split(self, option: str = "--split") -> str:
        """Why a full pass gave no record with captions: the split asked for, those the data has, and the `option`
        (`--split`, `train.split`) that reads every record."""
        split = normalise_split(self.cfg.split)
        if split is None or not self.splits:
            return f"{self.path} has no images with captions"
        held = ", ".join(f"{name} {n:,}" for name, n in self.splits.most_common())
        every = f"{option} {ALL}" if option.startswith("--") else f"{option}={ALL}"
        return f"{self.path} has no images with captions in split {split!r} (it has {held}); {every} reads every record"


def open_dataset(path: str | Path, cfg: DataCfg | None = None) -> Dataset:
    """Pick the reader for `path` (`cfg.format`, or detection when it is `auto`); nothing is read yet.

    Raises:
        ValueError: unknown format or split, or a layout no reader recognises.
        FileNotFoundError: the path does not exist.
    """
    cfg = cfg or DataCfg()
    normalise_split(cfg.split)  # fail now on a bad --split
    if cfg.format == "auto":
        name, reason = detect_format(path)
        return Dataset(str(path), name, f"auto: {reason}", cfg)
    if cfg.format not in READERS:
        raise ValueError(f"unknown dataset format {cfg.format!r}; formats: {', '.join(FORMATS)}")
    if not Path(path).exists() and not wds.is_pattern(str(path)):
        raise FileNotFoundError(f"no such dataset: {path}")
    return Dataset(str(path), cfg.format, "chosen with --format", cfg)
