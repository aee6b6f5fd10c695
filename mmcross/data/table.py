"""Tables of image paths and captions: CSV, TSV, JSONL and Parquet with named columns.

- Image column: `--image-col`, else the first of `image`, `filepath` (open_clip's CSV loader), `image_path`,
  `file_name` (Hugging Face imagefolder), `filename`, `path`, `img`. A cell is a path (relative paths resolve
  against `--image-root`, else the table's folder), or, in Parquet, encoded bytes or a `{"bytes", "path"}` struct.
- Caption column: `--caption-col`, else the first of `caption`, `captions`, `title` (open_clip), `text`,
  `sentences`, `raw`. A cell is one caption or a list of captions (in CSV/TSV, a JSON list such as `["a", "b"]`).
- Optional columns: `split` (train / dev / val / test) and `image_id`.
- A row per pair or a row per image: rows naming the same image (and split) become one record, in first-seen order.
- CSV delimiter: comma, or TAB when the header has more tabs than commas (open_clip's default separator is TAB).
- A folder argument reads every table in it; a table named `train.csv`, `dev.jsonl`, ... gives its rows that split
  when they have no `split` column (the layout `mmcross data convert --to csv` writes).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.records import (
    SPLIT_ALIASES,
    ReadStats,
    Record,
    clean_caption,
    decode_text,
    normalise_split,
    read_lines,
)

NAME = "table"
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_COLS = ("image", "filepath", "image_path", "file_name", "filename", "path", "img")
CAPTION_COLS = ("caption", "captions", "title", "text", "sentences", "raw")
_SKIP = ("rejects",)  # files a job writes beside its outputs, never data


@dataclass
class _Columns:
    image: str
    caption: str
    split: str | None
    image_id: str | None


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{path.name} has no column {wanted!r} ({what}); columns: {', '.join(names)}")
        return wanted
    for name in defaults:
        if name in names:
            return name
    raise ValueError(
        f"{path.name}: no {what} column among {', '.join(names) or 'none'}; name one with --{what}-col "
        f"(recognised: {', '.join(defaults)})"
    )


def _columns(names: list[str], cfg: DataCfg, path: Path) -> _Columns:
    return _Columns(
        image=_pick(names, cfg.image_col, IMAGE_COLS, "image", path),
        caption=_pick(names, cfg.caption_col, CAPTION_COLS, "caption", path),
        split="split" if "split" in names else None,
        image_id="image_id" if "image_id" in names else None,
    )


def _header(path: Path) -> tuple[list[str], str]:
    """Column names of a table file, read cheaply, and the CSV delimiter."""
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names), ","
    with open(path, "rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n")
    if kind == "jsonl":
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name}: the first line is not a JSON object, so the columns are unknown")
        return list(row), ","
    delimiter = "\t" if kind == "tsv" or first.count("\t") > first.count(",") else ","
    return next(csv.reader([first], delimiter=delimiter), []), delimiter


def _tables(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(_SKIP) and not p.name.startswith(".")
    )


def _recognised(path: Path, cfg: DataCfg) -> bool:
    try:
        _columns(_header(path)[0], cfg, path)
        return True
    except (ValueError, OSError, ImportError):
        return False


def detect(path: Path) -> str | None:
    """Why `path` looks like a table (or a folder of tables) with image and caption columns, or None."""
    if path.is_file() and path.suffix.lower() in SUFFIXES:
        return f"{path.name} is a {SUFFIXES[path.suffix.lower()].upper()} table"
    if path.is_dir():
        found = [p for p in _tables(path) if _recognised(p, DataCfg())]
        if found:
            return f"found table(s) {', '.join(p.name for p in found)}"
    return None


def _rows(path: Path, stats: ReadStats, cfg: DataCfg) -> tuple[_Columns, Iterator[tuple[int, dict]]]:
    """Column choice and (line, row) pairs; CSV/TSV cells are decoded here (invalid UTF-8 replaced and counted)."""
    kind = SUFFIXES[path.suffix.lower()]
    names, delimiter = _header(path)
    cols = _columns(names, cfg, path)
    if kind == "jsonl":
        return cols, _jsonl_rows(path, stats)
    wanted = [c for c in (cols.image, cols.caption, cols.split, cols.image_id) if c]
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=wanted)
        return cols, ((number, row) for number, row in enumerate(table.to_pylist(), start=1))
    import pyarrow as pa
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(include_columns=wanted, column_types={c: pa.binary() for c in wanted}),
    )

    def decoded() -> Iterator[tuple[int, dict]]:
        for number, row in enumerate(table.to_pylist(), start=2):  # line 1 is the header
            yield number, {k: None if v is None else decode_text(v, stats) for k, v in row.items()}

    return cols, decoded()


def _jsonl_rows(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    for number, line in read_lines(path, stats):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            stats.reject(path, f"malformed JSON line: {err.msg}", kind="record", line=number)
            continue
        if not isinstance(row, dict):
            stats.reject(path, "JSON line is not an object", kind="record", line=number)
            continue
        yield number, row


def _caption_list(cell: object, csv_cell: bool) -> list[object]:
    if isinstance(cell, str) and csv_cell and cell.lstrip().startswith("["):
        try:
            parsed = json.loads(cell)
            if isinstance(parsed, list):
                return parsed
        except json.JSONDecodeError:
            pass
    if isinstance(cell, list | tuple):
        return [c.get("raw") or c.get("caption") if isinstance(c, dict) else c for c in cell]
    return [cell]


def read_file(path: Path, cfg: DataCfg, stats: ReadStats, file_split: str | None = None) -> Iterator[Record]:
    """Records of one table file, rows grouped by (image, split)."""
    cols, rows = _rows(path, stats, cfg)
    csv_cell = SUFFIXES[path.suffix.lower()] in ("csv", "tsv")
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    stats.notes.append(f"{path.name}: image column {cols.image!r}, caption column {cols.caption!r}")
    records: dict[tuple[str, str | None], Record] = {}
    for number, row in rows:
        cell = row.get(cols.image)
        split = normalise_split(row.get(cols.split), strict=False) if cols.split else file_split
        record_path, data, image_id = None, None, None
        if isinstance(cell, dict) and cell.get("bytes"):
            data, image_id = cell["bytes"], cell.get("path") or f"{path.name}:{number}"
        elif isinstance(cell, bytes | bytearray) and cell:
            data, image_id = bytes(cell), f"{path.name}:{number}"
        elif isinstance(cell, str) and cell.strip():
            image_id = cell.strip()
            record_path = root / image_id
        else:
            stats.reject(path, f"row without an image in column {cols.image!r}", kind="record", line=number)
            continue
        if cols.image_id and row.get(cols.image_id) not in (None, ""):
            image_id = str(row[cols.image_id])
        key = (str(record_path) if record_path else image_id, split)
        record = records.get(key)
        if record is None:
            record = records[key] = Record(image_id, [], split, record_path, data, path.name)
        record.lines.append(number)
        for text in _caption_list(row.get(cols.caption), csv_cell):
            caption = clean_caption(text, stats, path, image_id=image_id, line=number)
            if caption is not None:
                record.captions.append(caption)
    yield from records.values()


def read(path: Path, cfg: DataCfg, stats: ReadStats) -> Iterator[Record]:
    """Records of a table file, or of every table in a folder."""
    if path.is_file():
        yield from read_file(path, cfg, stats)
        return
    files = _tables(path)
    if not files:
        raise ValueError(f"no table (.csv, .tsv, .jsonl, .parquet) in {path}")
    for file in files:
        stem = file.stem.lower()
        yield from read_file(file, cfg, stats, SPLIT_ALIASES.get(stem))
