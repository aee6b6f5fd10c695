"""Tables of image paths and captions: CSV, TSV, JSONL and Parquet with named columns.

- Image column: `--image-col`, else the first of `image`, `filepath` (open_clip's CSV loader), `image_path`,
  `file_name` (Hugging Face imagefolder), `filename`, `path`, `img`. A cell is a path (relative paths resolve
  against `--image-root`, else the table's folder), or, in Parquet, encoded bytes or a `{"bytes", "path"}` struct.
- Caption column: `--caption-col`, else the first of `caption`, `captions`, `title` (open_clip), `text`,
  `sentences`, `raw`. A cell is one caption or a list of captions (in CSV/TSV, a JSON list such as `["a", "b"]`).
- Optional columns: `split` (train / dev / val / test) and `image_id`.
- A row per pair or a row per image: rows naming the same image (and split) become one record, in first-seen order.
- CSV delimiter: sniffed (`csv.Sniffer`) among comma, TAB, semicolon and bar from the first lines; `.tsv` is TAB.
  A `.csv` that `mmcross data convert --to csv` wrote (TAB, as open_clip's loader reads) is read as it was written.
- Invalid UTF-8 in a cell is replaced by U+FFFD and counted (`ReadStats.invalid_utf8`); the row is kept.
- A folder argument reads every table in it; a table named `train.csv`, `dev.jsonl`, ... gives its rows that split
  when they have no `split` column (the layout `mmcross data convert --to csv` writes).

Every command reads tables here: the dataset reader (`read`: rows grouped into records, for index, eval, train,
validate, convert) and `numbered_batches` (every row and column as Arrow record batches of one schema, each row
with its number in the input, for `score`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

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
DELIMITERS = ",\t;|"
_SNIFF_BYTES = 64 * 1024  # enough lines for the sniffer to see which delimiter every line shares


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


def pick_columns(names: list[str], image_col: str | None, caption_col: str | None, path: Path) -> tuple[str, str]:
    """(image column, caption column): the named ones (which must exist), else the first recognised name of each;
    never one column for both (a path scored as its own caption)."""
    image, caption = (
        _pick(names, image_col, IMAGE_COLS, "image", path),
        _pick(names, caption_col, CAPTION_COLS, "caption", path),
    )
    if image == caption:
        raise ValueError(f"{path.name}: column {image!r} cannot be both the image and the caption column")
    return image, caption


def _columns(names: list[str], cfg: DataCfg, path: Path) -> _Columns:
    image, caption = pick_columns(names, cfg.image_col, cfg.caption_col, path)
    return _Columns(
        image=image,
        caption=caption,
        split="split" if "split" in names else None,
        image_id="image_id" if "image_id" in names else None,
    )


def sniff_delimiter(path: Path) -> str:
    """The delimiter of a CSV file, by `csv.Sniffer` on its first lines; TAB for `.tsv`.

    When the sniffer cannot tell (a single column, one line), the header decides: TAB when it has more tabs than
    commas, else comma.
    """
    if path.suffix.lower() == ".tsv":
        return "\t"
    with open(path, "rb") as handle:
        sample = handle.read(_SNIFF_BYTES)
    text = sample.decode("utf-8", errors="replace").removeprefix("\ufeff")
    if len(sample) == _SNIFF_BYTES and "\n" in text:
        text = text[: text.rindex("\n")]  # whole lines only
    try:
        return csv.Sniffer().sniff(text, delimiters=DELIMITERS).delimiter
    except csv.Error:
        first = text.split("\n", 1)[0]
        return "\t" if first.count("\t") > first.count(",") else ","


def _jsonl_columns(path: Path) -> list[str]:
    """The keys of a JSONL table's objects in the first `_SNIFF_BYTES`, in first-seen order: rows may leave keys
    out (a row without `split` before rows with one), and blank or malformed lines are skipped here (the reader
    rejects malformed ones)."""
    with open(path, "rb") as handle:
        sample = handle.read(_SNIFF_BYTES)
    lines = sample.decode("utf-8", errors="replace").removeprefix("\ufeff").splitlines()
    if len(sample) == _SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # whole lines only
    columns: dict[str, None] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    if not columns:
        raise ValueError(
            f"{path.name}: no line of its first {_SNIFF_BYTES // 1024} KiB is a JSON object, so the columns are unknown"
        )
    return list(columns)


def header(path: Path) -> tuple[list[str], str]:
    """Column names of a table file, read cheaply, and its CSV delimiter ("," for JSONL and Parquet)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown table type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        names, delimiter = list(pq.read_schema(path).names), ","
    elif kind == "jsonl":
        return _jsonl_columns(path), ","
    else:
        with open(path, "rb") as handle:
            first = handle.readline().decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n")
        if not first.strip():
            raise ValueError(f"{path} is empty (no header row)")
        delimiter = sniff_delimiter(path)
        names = next(csv.reader([first], delimiter=delimiter), [])
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # Arrow cannot tell the two apart: a lookup by name fails, or reads the wrong one
        raise ValueError(f"{path.name} names column(s) {', '.join(map(repr, twice))} more than once; rename one")
    return names, delimiter


def read_batches(
    path: Path, stats: ReadStats, *, batch_size: int = 1024, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Every row of a table file as Arrow record batches of at most `batch_size` rows, streamed.

    CSV/TSV cells are strings (empty cells ""), invalid UTF-8 replaced and counted in `stats`; malformed JSONL lines
    become rejects in `stats`. `columns` limits what is read (default: every column).
    """
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
    elif kind == "jsonl":
        rows: list[dict] = []
        for _, row in _jsonl_rows(path, stats):
            rows.append({k: row.get(k) for k in columns} if columns else row)
            if len(rows) == batch_size:
                yield pa.RecordBatch.from_pylist(rows)
                rows = []
        if rows:
            yield pa.RecordBatch.from_pylist(rows)
    else:
        yield from _csv_batches(path, stats, batch_size, columns)


@dataclass
class Malformed:
    """An input row no reader could make a row of (a JSONL line that is no JSON object, a CSV row with another number
    of fields than its header): `score` writes it with its number and this reason, and no other cells."""

    number: int
    reason: str


def numbered_batches(
    path: Path, stats: ReadStats, batch_size: int
) -> Iterator[tuple[pa.RecordBatch, list[int], list[Malformed]]]:
    """Every row of a table as record batches of one schema, with each row's number in the input, and the
    malformed rows since the previous batch (each also a reject in `stats`); what `score` reads.

    Numbers: a JSONL row's line; a CSV/TSV row's data row (the header and blank lines not counted); a Parquet
    row's position. A JSONL file's columns and their types come from a pass over the whole file (`_jsonl_schema`),
    so every batch has every key, whatever its first rows hold.
    """
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        yield from _jsonl_numbered(path, stats, batch_size)
        return
    ragged: dict[int, str] = {}  # filled by Arrow's CSV reader as it skips rows, each before the batch after it
    if kind == "parquet":
        batches = read_batches(path, stats, batch_size=batch_size)
    else:
        batches = _csv_batches(path, stats, batch_size, None, ragged.__setitem__)
    number, schema = 0, None
    for batch in batches:
        schema, numbers, skipped = batch.schema, [], []
        for _ in range(batch.num_rows):
            number += 1
            while number in ragged:  # a skipped row keeps its number
                skipped.append(Malformed(number, ragged.pop(number)))
                number += 1
            numbers.append(number)
        yield batch, numbers, skipped
    if ragged:  # after the last good row
        names = schema.names if schema is not None else header(path)[0]
        empty = pa.RecordBatch.from_arrays([pa.array([], pa.string()) for _ in names], names=names)
        yield empty, [], [Malformed(n, reason) for n, reason in sorted(ragged.items())]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        return "strings"
    return "other"


_ARROW = {
    frozenset({"bool"}): pa.bool_(),
    frozenset({"int"}): pa.int64(),
    frozenset({"int", "float"}): pa.float64(),
    frozenset({"float"}): pa.float64(),
    frozenset({"str"}): pa.string(),
    frozenset({"strings"}): pa.list_(pa.string()),
}


JSON_TEXT = {b"mmcross": b"json-text"}  # field metadata of a column whose non-string cells are JSON text


def _jsonl_schema(path: Path) -> tuple[pa.Schema, set[str]]:
    """The Arrow schema of a JSONL table, from every line: each key in first-seen order, one type per key (ints and
    floats together: float64). A key whose values differ otherwise (strings and lists, objects, mixed lists) is a
    string column: strings as they are, other values as JSON text (its field carries `JSON_TEXT`; the names are the
    second item)."""
    kinds: dict[str, set[str]] = {}
    for _, row in _jsonl_rows(path, ReadStats()):
        for key, value in row.items():
            kinds.setdefault(key, set()).add(_kind(value))
    fields, as_text = [], set()
    for key, seen in kinds.items():
        arrow = _ARROW.get(frozenset(seen - {"null"}), pa.string() if seen == {"null"} else None)
        if arrow is None:
            as_text.add(key)
        fields.append(pa.field(key, pa.string(), metadata=JSON_TEXT) if arrow is None else pa.field(key, arrow))
    return pa.schema(fields), as_text


def _jsonl_numbered(
    path: Path, stats: ReadStats, batch_size: int
) -> Iterator[tuple[pa.RecordBatch, list[int], list[Malformed]]]:
    schema, as_text = _jsonl_schema(path)
    rows, numbers, malformed = [], [], []
    for number, line in read_lines(path, stats):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            reason = None if isinstance(row, dict) else "JSON line is not an object"
        except json.JSONDecodeError as err:
            reason = f"malformed JSON line: {err.msg}"
        if reason is not None:
            stats.reject(path, reason, kind="record", line=number)
            malformed.append(Malformed(number, reason))
            continue
        for key in as_text.intersection(row):
            value = row[key]
            row[key] = value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append(row)
        numbers.append(number)
        if len(rows) == batch_size:
            yield pa.RecordBatch.from_pylist(rows, schema=schema), numbers, malformed
            rows, numbers, malformed = [], [], []
    if rows or malformed:
        yield pa.RecordBatch.from_pylist(rows, schema=schema), numbers, malformed


def _csv_batches(
    path: Path,
    stats: ReadStats,
    batch_size: int,
    columns: list[str] | None,
    on_malformed: Callable[[int, str], object] | None = None,
) -> Iterator[pa.RecordBatch]:
    """`read_batches` for CSV/TSV; `on_malformed(data row, reason)` hears of each row skipped for its field count
    (numbered as `numbered_batches` numbers rows), before the batch that follows it."""
    import pyarrow.csv as pcsv

    names, delimiter = header(path)

    def malformed(row) -> str:
        reason = f"malformed row ({row.actual_columns} fields, the header has {len(names)})"
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        stats.reject(path, f"{reason}: {text}", kind="record")
        if on_malformed is not None:
            # Arrow's physical row number counts the header as row 1 and skips blank lines, as our numbers do
            # (a quoted cell's line breaks stay inside its row); it is known because the reader runs serially
            if row.number is None or row.number < 2:
                raise RuntimeError(f"{path}: pyarrow gave no row number for a malformed row ({text})")
            on_malformed(row.number - 1, reason)
        return "skip"

    reader = pcsv.open_csv(
        path,
        read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=malformed),
        # bytes first, so one line of invalid UTF-8 is replaced and counted instead of failing the whole file
        convert_options=pcsv.ConvertOptions(
            include_columns=columns or [], column_types={name: pa.binary() for name in names}
        ),
    )
    for batch in reader:
        decoded = pa.RecordBatch.from_arrays([_utf8(c, stats) for c in batch.columns], names=batch.schema.names)
        for start in range(0, decoded.num_rows, batch_size):
            yield decoded.slice(start, batch_size)


def _utf8(column: pa.Array, stats: ReadStats) -> pa.Array:
    """A binary column as strings: Arrow's validating cast, else cell by cell with replacement (and a count)."""
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else decode_text(v, stats) for v in column.to_pylist()], pa.string())


def count_rows(path: Path) -> int:
    """Rows of a table file for a progress total: exact for Parquet, lines (less a CSV header) otherwise."""
    if SUFFIXES[path.suffix.lower()] == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(lines - (SUFFIXES[path.suffix.lower()] in ("csv", "tsv")), 0)


def _tables(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(_SKIP) and not p.name.startswith(".")
    )


def _recognised(path: Path, cfg: DataCfg) -> bool:
    try:
        _columns(header(path)[0], cfg, path)
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
    cols = _columns(header(path)[0], cfg, path)
    if kind == "jsonl":
        return cols, _jsonl_rows(path, stats)
    wanted = [c for c in (cols.image, cols.caption, cols.split, cols.image_id) if c]
    first = 2 if kind in ("csv", "tsv") else 1  # a CSV's line 1 is the header

    def rows() -> Iterator[tuple[int, dict]]:
        number = first
        for batch in read_batches(path, stats, columns=wanted):
            for row in batch.to_pylist():
                yield number, row
                number += 1

    return cols, rows()


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


def caption_list(cell: object, csv_cell: bool) -> list[object]:
    """The captions of a cell: a list (JSON text in a CSV cell, a list in JSONL or Parquet), or the one caption."""
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


def image_source(cell: object, root: Path, name: str) -> tuple[str, Path | None, bytes | None] | None:
    """(image id, file, encoded bytes) of an image cell, or None when it names no image: a path (relative to
    `root`), encoded bytes (id `name`), or a `{"bytes", "path"}` struct (Hugging Face's Image feature, which keeps
    files on disk as `{"bytes": None, "path": ...}`)."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell.get("path") or name, None, bytes(cell["bytes"])
    if isinstance(cell, dict):
        cell = cell.get("path")
    if isinstance(cell, bytes | bytearray) and cell:
        return name, None, bytes(cell)
    if isinstance(cell, str) and cell.strip():
        return cell.strip(), root / cell.strip(), None
    return None


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
        source = image_source(cell, root, f"{path.name}:{number}")
        if source is None:
            stats.reject(path, f"row without an image in column {cols.image!r}", kind="record", line=number)
            continue
        image_id, record_path, data = source
        if cols.image_id and row.get(cols.image_id) not in (None, ""):
            image_id = str(row[cols.image_id])
        key = (str(record_path) if record_path else image_id, split)
        record = records.get(key)
        if record is None:
            record = records[key] = Record(image_id, [], split, record_path, data, path.name)
        record.lines.append(number)
        for text in caption_list(row.get(cols.caption), csv_cell):
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
