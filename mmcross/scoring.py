"""Score a table of image-caption pairs, streaming: read a batch of rows, score it, write it, repeat.

The output holds every input row and column, in order, plus `input_row` (a CSV/TSV's 1-based data row, a JSONL's
line, a Parquet's row), `itc` (dual-encoder cosine), `itm` (fusion match probability), `score` (itm + itc_weight *
itc) and `reason` (why a row has no scores: missing image, unreadable image, empty caption, a malformed row, which
keeps only its `input_row`; empty for scored rows; "untrained head" when no run trained the fusion head: such rows
keep their itc and leave itm and score empty). A caption cell holding a
list (a `captions` column of a JSONL manifest, a JSON list in a CSV cell) becomes one row per caption, each with its
input row's `input_row` and other columns. The table is read by `mmcross.data.table` (the reader every command
uses: delimiter and columns detected, invalid UTF-8 replaced and counted). Memory stays flat in the number of rows.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from mmcross.data import table
from mmcross.data.records import ReadStats, Record, blank_caption
from mmcross.encode import encode_images, encode_texts
from mmcross.encoders import longer_than_context
from mmcross.model import Matcher
from mmcross.progress import Progress

FORMATS = table.SUFFIXES
ADDED = ("input_row", "itc", "itm", "score", "reason")


@dataclass
class ScoreReport:
    rows: int  # input rows read
    written: int  # output rows: one per caption (more than `rows` when caption cells hold lists)
    scored: int  # output rows with scores
    bad: int  # output rows with a reason instead
    image_col: str = ""  # the columns used (named, or detected as `index` detects them)
    caption_col: str = ""
    stats: ReadStats = field(default_factory=ReadStats)  # invalid UTF-8 replaced; malformed rows (also written)
    head: bool = True  # itm and score written; False: the head is untrained, rows hold itc and "untrained head"
    with_itc: int = 0  # output rows with an itc (all scored rows, and with an untrained head the rows itc alone)
    cut: int = 0  # captions longer than the model's context, scored on the part that fits
    context: int = 0  # that context length (tokens)


UNTRAINED_HEAD = "untrained head"  # the reason of rows whose itm and score are left empty (`score_batch`)


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown table type {path.suffix!r}; use {', '.join(FORMATS)}")
    return fmt


def expand_captions(batch: pa.RecordBatch, caption_col: str, numbers: list[int], csv_cells: bool) -> pa.RecordBatch:
    """One row per caption of `batch` (a list cell gives several, an empty list one with no caption), with
    `input_row` (each row's number in the input, `numbers`) appended. `csv_cells`: a cell's JSON list text is a list."""
    take, captions = [], []
    for i, cell in enumerate(batch.column(caption_col).to_pylist()):
        texts = table.caption_list(cell, csv_cells) if cell is not None else [None]
        for text in texts or [None]:
            take.append(i)
            captions.append(None if text is None else str(text))
    out = batch.take(pa.array(take, pa.int64()))
    out = out.set_column(out.schema.get_field_index(caption_col), caption_col, pa.array(captions, pa.string()))
    return out.append_column("input_row", pa.array([numbers[i] for i in take], pa.int64()))


def _json_default(value: object) -> object:
    """JSON for what `json` cannot write: bytes (an image cell of a Parquet table) as base64 text."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _text_cells(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Columns a CSV cell cannot hold as they are: nested ones (lists, structs: a manifest's `negatives`, an image
    `{"bytes", "path"}`) as JSON text, binary ones (encoded images) as base64 text."""
    for i, column in enumerate(batch.schema):
        if pa.types.is_nested(column.type):
            cells = [
                None if v is None else json.dumps(v, ensure_ascii=False, default=_json_default)
                for v in batch.column(i).to_pylist()
            ]
        elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            cells = [None if v is None else _json_default(v) for v in batch.column(i).to_pylist()]
        else:
            continue
        batch = batch.set_column(i, column.name, pa.array(cells, pa.string()))
    return batch


class _Writer:
    def __init__(self, path: Path):
        self.path, self.fmt = path, _format(path)
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.writer = None
        self.handle = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "jsonl":
            if self.handle is None:
                self.handle = open(self.tmp, "w", encoding="utf-8")
            for row in batch.to_pylist():
                self.handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            return
        if self.fmt != "parquet":
            batch = _text_cells(batch)
        if self.writer is None:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self.writer = pq.ParquetWriter(self.tmp, batch.schema)
            else:
                import pyarrow.csv as pcsv

                delimiter = "," if self.fmt == "csv" else "\t"
                self.writer = pcsv.CSVWriter(
                    self.tmp, batch.schema, write_options=pcsv.WriteOptions(delimiter=delimiter)
                )
        self.writer.write_batch(batch)

    def close(self, keep: bool = True) -> None:
        """Close; rename the temporary file to the real name when `keep`, else delete it."""
        if self.handle is not None:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()
        if self.tmp.exists():
            if keep:
                self.tmp.replace(self.path)
            else:
                self.tmp.unlink()


@torch.inference_mode()
def score_batch(
    matcher: Matcher, images: list, captions: list, image_root: Path, head: bool = True
) -> tuple[list, list, list, list]:
    """(itc, itm, score, reason) lists for aligned image cells (paths, encoded bytes or `{"bytes", "path"}`, as
    `mmcross.data.table.image_source` reads them) and captions; bad rows get None scores.

    With `head` False only itc is computed (the fusion is not run): itm and score stay None with the reason
    "untrained head" (pretrained encoders alone give a meaningful itc, CLIPScore-style; a random head does not).
    """
    n = len(images)
    itc, itm, score, reason = [None] * n, [None] * n, [None] * n, [None] * n
    rows, records = [], []
    for i, (image, caption) in enumerate(zip(images, captions)):
        source = table.image_source(image, image_root, f"row {i + 1}")
        if caption is None or blank_caption(caption):
            reason[i] = "empty caption"
        elif source is None:
            reason[i] = "no image path"
        else:
            rows.append(i)
            image_id, path, data = source
            records.append(Record(image_id, [], path=path, data=data))
    for batch in encode_images(matcher, records, batch_size=max(len(records), 1)):
        for pos, reject in batch.rejects:
            reason[rows[pos]] = f"image: {reject.reason}"
        if batch.features is None:
            continue
        good = [rows[pos] for pos in batch.indices]
        texts = encode_texts(matcher, [str(captions[i]).strip() for i in good], batch_size=len(good))
        if not head:
            cosines = (batch.features.pooled.float() * texts.pooled.float()).sum(-1)  # (B,)
            for j, i in enumerate(good):
                itc[i], reason[i] = float(cosines[j]), UNTRAINED_HEAD
            continue
        s = matcher.score_pairs(batch.features, texts)
        for j, i in enumerate(good):
            itc[i], itm[i], score[i] = float(s.itc[j]), float(s.itm[j]), float(s.score[j])
    return itc, itm, score, reason


def score_pairs(
    pairs: str | Path,
    out: str | Path,
    matcher: Matcher,
    *,
    image_root: str | Path | None = None,
    image_col: str | None = None,
    caption_col: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    allow_untrained_head: bool = False,
) -> ScoreReport:
    """Score every row of a pairs table into `out` (written under a temporary name, renamed when complete).

    Args:
        pairs: CSV, TSV, JSONL or Parquet with an image-path column and a caption column.
        out: .csv, .tsv, .jsonl or .parquet.
        matcher: the model.
        image_root: folder relative image paths resolve against (default: the pairs file's folder).
        image_col: the image-path column (default: detected, as `mmcross.data.table` does for every command).
        caption_col: the caption column (default: detected); a cell may hold a list of captions.
        batch_size: rows per read and per forward pass.
        progress: show progress on stderr (a bar on a terminal, a line every ~30 s otherwise).
        allow_untrained_head: write itm and score even when no run trained the head (else they stay empty, with
            the reason "untrained head", and `report.head` is False).
    """
    pairs, out = Path(pairs), Path(out)
    _format(out)
    _format(pairs)
    if not pairs.is_file():
        raise FileNotFoundError(f"no pairs file {pairs}")
    image_col, caption_col = table.pick_columns(table.header(pairs)[0], image_col, caption_col, pairs)
    csv_cells = FORMATS[pairs.suffix.lower()] in ("csv", "tsv")
    root = Path(image_root) if image_root is not None else pairs.parent
    report = ScoreReport(0, 0, 0, 0, image_col, caption_col, head=matcher.head_trained or allow_untrained_head)
    writer = _Writer(out)
    try:
        with Progress(table.count_rows(pairs), "scoring", "rows", enabled=progress) as bar:
            for batch, numbers, malformed in table.numbered_batches(pairs, report.stats, batch_size):
                _check_columns(batch.schema.names, image_col, caption_col, pairs)
                text_cells = csv_cells or batch.schema.field(caption_col).metadata == table.JSON_TEXT
                expanded = expand_captions(batch, caption_col, numbers, text_cells)
                captions = [c for c in expanded.column(caption_col).to_pylist() if c is not None]
                cut, report.context = longer_than_context(matcher.text_encoder.tokenizer, captions)
                report.cut += cut
                parts = [
                    _scored(matcher, expanded.slice(start, batch_size), image_col, caption_col, root, report.head)
                    for start in range(0, expanded.num_rows, batch_size)
                ]
                for part in _in_input_order(parts, malformed, expanded):
                    writer.write(part)
                    report.bad += part.num_rows - part.column("reason").null_count
                    report.written += part.num_rows
                    report.with_itc += part.num_rows - part.column("itc").null_count
                report.rows += batch.num_rows + len(malformed)
                bar.advance(batch.num_rows + len(malformed))
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close()
    if report.rows == 0:
        raise ValueError(f"{pairs} has no rows")
    report.scored = report.written - report.bad
    return report


def _in_input_order(
    parts: list[pa.RecordBatch], malformed: list[table.Malformed], expanded: pa.RecordBatch
) -> list[pa.RecordBatch]:
    """The scored parts with a row for each malformed input row (its `input_row` and reason, no other cells) put
    where it stood in the input."""
    if not malformed:
        return parts
    schema = parts[0].schema if parts else _scored_schema(expanded.schema)
    rows = pa.RecordBatch.from_pylist([{"input_row": m.number, "reason": m.reason} for m in malformed], schema=schema)
    merged = pa.Table.from_batches([*parts, rows], schema=schema).sort_by("input_row")  # a stable sort
    return merged.combine_chunks().to_batches() or [rows.slice(0, 0)]


def _scored_schema(schema: pa.Schema) -> pa.Schema:
    """The output schema of a batch whose rows `expand_captions` made (`input_row` already appended)."""
    for name, kind in zip(ADDED[1:], (pa.float64(), pa.float64(), pa.float64(), pa.string())):
        schema = schema.append(pa.field(name, kind))
    return schema


def _check_columns(names: list[str], image_col: str, caption_col: str, pairs: Path) -> None:
    for col in (image_col, caption_col):
        if col not in names:
            raise ValueError(f"{pairs} has no column {col!r}; columns: {', '.join(names)}")
    clash = [c for c in ADDED if c in names]
    if clash:
        raise ValueError(f"{pairs} already has column(s) {', '.join(clash)}, which score would add")


def _scored(
    matcher: Matcher, batch: pa.RecordBatch, image_col: str, caption_col: str, root: Path, head: bool = True
) -> pa.RecordBatch:
    """`batch` with the itc, itm, score and reason columns appended (itc only when not `head`)."""
    itc, itm, score, reason = score_batch(
        matcher, batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist(), root, head
    )
    arrays = [*batch.columns, pa.array(itc, pa.float64()), pa.array(itm, pa.float64())]
    arrays += [pa.array(score, pa.float64()), pa.array(reason, pa.string())]
    return pa.RecordBatch.from_arrays(arrays, schema=_scored_schema(batch.schema))
