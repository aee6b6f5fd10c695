"""Score a table of image-caption pairs, streaming: read a batch of rows, score it, write it, repeat.

The output holds every input row and column, in order, plus `itc` (dual-encoder cosine), `itm` (fusion match
probability), `score` (itm + itc_weight * itc) and `reason` (why a row has no scores: missing image, unreadable
image, empty caption; empty for scored rows). Memory stays flat in the number of rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from mmcross.encode import encode_images, encode_texts, image_file_records
from mmcross.model import Matcher

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ADDED = ("itc", "itm", "score", "reason")


@dataclass
class ScoreReport:
    rows: int  # rows read (and written)
    scored: int  # rows with scores
    bad: int  # rows with a reason instead


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown table type {path.suffix!r}; use {', '.join(FORMATS)}")
    return fmt


def read_batches(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a CSV/TSV (all columns as strings), JSONL or Parquet file, streamed."""
    fmt = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pairs file {path}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        delimiter = "," if fmt == "csv" else "\t"
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            raise ValueError(f"{path} is empty (no header row)")
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 20),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False
            ),
        )
        for batch in reader:
            for start in range(0, batch.num_rows, batch_size):
                yield batch.slice(start, batch_size)
    else:
        rows: list[dict] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON: {err}") from None
                if len(rows) == batch_size:
                    yield pa.RecordBatch.from_pylist(rows)
                    rows = []
        if rows:
            yield pa.RecordBatch.from_pylist(rows)


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
                self.handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return
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
def score_batch(matcher: Matcher, images: list, captions: list, image_root: Path) -> tuple[list, list, list, list]:
    """(itc, itm, score, reason) lists for aligned image paths and captions; bad rows get None scores."""
    n = len(images)
    itc, itm, score, reason = [None] * n, [None] * n, [None] * n, [None] * n
    rows, paths = [], []
    for i, (image, caption) in enumerate(zip(images, captions)):
        if caption is None or not str(caption).strip():
            reason[i] = "empty caption"
        elif image is None or not str(image).strip():
            reason[i] = "no image path"
        else:
            rows.append(i)
            paths.append(str(image))
    for batch in encode_images(matcher, image_file_records(paths, image_root), batch_size=max(len(paths), 1)):
        for pos, reject in batch.rejects:
            reason[rows[pos]] = f"image: {reject.reason}"
        if batch.features is None:
            continue
        good = [rows[pos] for pos in batch.indices]
        texts = encode_texts(matcher, [str(captions[i]).strip() for i in good], batch_size=len(good))
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
    image_col: str = "image",
    caption_col: str = "caption",
    batch_size: int = 64,
) -> ScoreReport:
    """Score every row of a pairs table into `out` (written under a temporary name, renamed when complete).

    Args:
        pairs: CSV, TSV, JSONL or Parquet with an image-path column and a caption column.
        out: .csv, .tsv, .jsonl or .parquet.
        matcher: the model.
        image_root: folder relative image paths resolve against (default: the pairs file's folder).
        image_col: the image-path column.
        caption_col: the caption column.
        batch_size: rows per read and per forward pass.
    """
    pairs, out = Path(pairs), Path(out)
    _format(out)
    root = Path(image_root) if image_root is not None else pairs.parent
    writer = _Writer(out)
    rows = bad = 0
    try:
        for batch in read_batches(pairs, batch_size):
            names = batch.schema.names
            for col in (image_col, caption_col):
                if col not in names:
                    raise ValueError(f"{pairs} has no column {col!r}; columns: {', '.join(names)}")
            clash = [c for c in ADDED if c in names]
            if clash:
                raise ValueError(f"{pairs} already has column(s) {', '.join(clash)}, which score would add")
            itc, itm, score, reason = score_batch(
                matcher, batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist(), root
            )
            arrays = [*batch.columns, pa.array(itc, pa.float64()), pa.array(itm, pa.float64())]
            arrays += [pa.array(score, pa.float64()), pa.array(reason, pa.string())]
            writer.write(pa.RecordBatch.from_arrays(arrays, names=[*names, *ADDED]))
            rows += batch.num_rows
            bad += sum(r is not None for r in reason)
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close()
    if rows == 0:
        raise ValueError(f"{pairs} has no rows")
    return ScoreReport(rows, rows - bad, bad)
