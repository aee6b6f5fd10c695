"""`mmcross data validate`: read a whole dataset, decode every image, and report what a job would meet.

The report gives images and captions per split, missing image files (with the caption lines that name them),
unreadable images with their reasons, duplicate ids, caption problems (empty, invalid UTF-8) and a caption-length
summary in words and in tokens of a model's tokenizer (captions longer than its context are counted: open_clip
truncates them). Every image is fully decoded (not just its header checked), in worker processes.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmcross.config import DataCfg
from mmcross.data.images import try_decode
from mmcross.data.parallel import imap_ordered
from mmcross.data.records import UNASSIGNED, Record, Reject, RejectLog
from mmcross.data.registry import Dataset, open_dataset

MISSING = "missing file"
SHOW = 20  # problems listed by name in the text report (all of them are in --json and rejects.jsonl)


@dataclass
class SplitSummary:
    images: int = 0  # records (images named by the dataset)
    readable: int = 0  # of those, images that decoded
    captions: int = 0


@dataclass
class ValidationReport:
    """What `validate` found; `to_dict()` is the `--json` output."""

    dataset: str
    format: str
    reason: str  # why this reader was used
    notes: list[str] = field(default_factory=list)
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    images: int = 0  # records read
    readable: int = 0  # images that decoded to RGB
    missing: list[dict] = field(default_factory=list)  # {"image_id", "path", "origin", "lines"}
    unreadable: list[dict] = field(default_factory=list)  # {"image_id", "path", "reason"}
    duplicate_ids: dict[str, int] = field(default_factory=dict)  # id -> how many records carry it
    orphans: list[str] = field(default_factory=list)  # image files that no caption names (Flickr layout)
    without_captions: int = 0  # records with no caption at all
    captions: dict = field(default_factory=dict)  # counts and length summary, see `_caption_summary`
    image_formats: dict[str, int] = field(default_factory=dict)  # JPEG: 7091, ...
    image_modes: dict[str, int] = field(default_factory=dict)  # RGB, L, P, RGBA, CMYK, I;16, ...
    rotated: int = 0  # images with an EXIF orientation applied
    transparent: int = 0  # images composited on the background colour
    rejects: list[Reject] = field(default_factory=list)
    seconds: float = 0.0
    why_empty: str = ""  # no record at all: the split asked for, the splits the data has, and how to read them all

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rejects"] = len(self.rejects)
        return data

    @property
    def failed(self) -> bool:
        """Nothing at all could be read."""
        return self.readable == 0


def _check(item: tuple) -> tuple:
    """Worker: decode one image; a small picklable summary or the reject reason.

    JPEGs decode at their smallest DCT scale (`draft_size`): the whole bitstream is still read and entropy-decoded,
    so truncated and corrupt files fail as they would at full size, for about a third less work.
    """
    source, where, image_id, max_pixels, background = item
    result = try_decode(source, where, image_id, max_pixels=max_pixels, background=background, draft_size=(1, 1))
    if isinstance(result, Reject):
        return ("reject", result.reason)
    return ("ok", result.format or "?", result.mode, result.rotated, result.transparent)


def _import_encoders() -> None:
    importlib.import_module("mmcross.encoders")


def _count_tokens(model_name: str, captions: list[str]) -> tuple[list[int], int]:
    from mmcross.encoders import count_tokens

    return count_tokens(model_name, captions)


def _caption_summary(records: list[Record], report: ValidationReport, model_name: str | None, tokenizer) -> dict:
    captions = [c for r in records for c in r.captions]
    words = [len(c.split()) for c in captions]
    summary: dict = {
        "total": len(captions),
        "empty_rejected": sum(1 for r in report.rejects if r.kind == "caption"),
        "invalid_utf8_replaced": 0,
        "per_image": dict(sorted(Counter(len(r.captions) for r in records).items())),
        "words": _spread(words),
    }
    if model_name and captions:
        try:
            if tokenizer is None:  # open_clip is already imported here: no process needed
                counts, context = _count_tokens(model_name, captions)
            else:
                counts, context = tokenizer.submit(_count_tokens, model_name, captions).result()
        except Exception as err:  # noqa: BLE001 - a tokenizer that needs the network must not stop validation
            summary["tokens"] = {"model": model_name, "error": str(err).splitlines()[0] if str(err) else repr(err)}
        else:
            over = [(r.image_id, c) for r in records for c in r.captions]
            over = [pair for pair, n in zip(over, counts) if n > context]
            summary["tokens"] = {
                "model": model_name,
                "context": context,
                **_spread(counts),
                "over_context": len(over),
                "over_context_examples": [{"image_id": i, "caption": c} for i, c in over[:5]],
            }
    return summary


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


def validate(
    dataset: str | Path,
    cfg: DataCfg | None = None,
    *,
    model_name: str | None = "ViT-B-32",
    workers: int | None = None,
    out_dir: str | Path | None = None,
) -> ValidationReport:
    """Read every record of `dataset`, decode every image, and summarise.

    Args:
        dataset: a dataset file, folder or shard pattern.
        cfg: format, split, columns and image options.
        model_name: open_clip architecture whose tokenizer counts caption tokens; None skips token counting.
        workers: decoding processes; None = one per CPU core, 0 = in this process.
        out_dir: when given, `rejects.jsonl` and `report.json` are written there.
    """
    start = time.perf_counter()
    cfg = cfg or DataCfg()
    data = open_dataset(dataset, cfg)  # a bad path or format fails here, before any process starts
    # Importing open_clip (and torch) for the tokenizer takes seconds: unless it is imported already, a process of
    # its own does it while the images decode, and counts the tokens afterwards.
    tokenizer = None
    if model_name and "mmcross.encoders" not in sys.modules:
        tokenizer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        if tokenizer is not None:
            tokenizer.submit(_import_encoders)
        report = _validate(data, cfg, model_name, workers, tokenizer)
    finally:
        if tokenizer is not None:
            tokenizer.shutdown(cancel_futures=True)
    report.seconds = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        RejectLog(out_dir).write(report.rejects)
        (Path(out_dir) / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report


def _validate(data: Dataset, cfg: DataCfg, model_name: str | None, workers: int | None, tokenizer) -> ValidationReport:
    report = ValidationReport(dataset=data.path, format=data.format, reason=data.reason)
    workers = (os.cpu_count() or 1) if workers is None else workers
    records: list[Record] = []

    def items():
        for record in data.records():
            records.append(record)
            source = record.data if record.data is not None else record.path
            yield source, record.where, record.image_id, cfg.max_image_pixels, tuple(cfg.background)
            record.data = None  # the bytes went to the checker; do not hold a whole shard set in memory

    results = list(imap_ordered(_check, items(), workers))
    formats, modes = Counter(), Counter()
    for record, result in zip(records, results):
        split = record.split or UNASSIGNED
        summary = report.splits.setdefault(split, SplitSummary())
        summary.images += 1
        summary.captions += len(record.captions)
        report.without_captions += not record.captions
        if result[0] == "ok":
            summary.readable += 1
            formats[result[1]] += 1
            modes[result[2]] += 1
            report.rotated += result[3]
            report.transparent += result[4]
            continue
        report.rejects.append(Reject(record.where, result[1], image_id=record.image_id))
        if result[1] == MISSING:
            report.missing.append(
                {"image_id": record.image_id, "path": record.where, "origin": record.origin, "lines": record.lines}
            )
        else:
            report.unreadable.append({"image_id": record.image_id, "path": record.where, "reason": result[1]})
    report.images = len(records)
    report.why_empty = "" if records else data.nothing_in_split()
    report.readable = sum(s.readable for s in report.splits.values())
    report.splits = dict(sorted(report.splits.items(), key=lambda kv: _split_order(kv[0])))
    report.image_formats, report.image_modes = dict(formats.most_common()), dict(modes.most_common())
    report.duplicate_ids = {k: n for k, n in Counter(r.image_id for r in records).items() if n > 1}
    report.notes = data.stats.notes
    report.orphans = data.stats.orphans
    report.rejects = data.stats.rejects + report.rejects
    report.captions = _caption_summary(records, report, model_name, tokenizer)
    report.captions["invalid_utf8_replaced"] = data.stats.invalid_utf8
    return report


def _split_order(name: str) -> int:
    return {"train": 0, "dev": 1, "test": 2}.get(name, 3)


def _lines(numbers: list[int]) -> str:
    if not numbers:
        return ""
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"lines {numbers[0]}-{numbers[-1]}"
    return ("line " if len(numbers) == 1 else "lines ") + ", ".join(map(str, numbers[:10]))


def format_report(report: ValidationReport) -> str:
    """The human-readable report `mmcross data validate` prints."""
    out = [
        f"dataset   {report.dataset}",
        f"format    {report.format} ({report.reason})",
        *(f"          {note}" for note in report.notes),
        f"images    {report.readable:,} readable of {report.images:,}: {len(report.missing):,} missing, "
        f"{len(report.unreadable):,} unreadable, {len(report.duplicate_ids):,} duplicate ids, "
        f"{report.without_captions:,} without captions",
    ]
    if report.image_formats:
        kinds = ", ".join(f"{k} {n:,}" for k, n in report.image_formats.items())
        modes = ", ".join(f"{k} {n:,}" for k, n in report.image_modes.items())
        out.append(
            f"          formats {kinds}; modes {modes}; {report.rotated} EXIF-rotated, "
            f"{report.transparent} with transparency"
        )
    caps = report.captions
    words = caps.get("words", {})
    out.append(
        f"captions  {caps.get('total', 0):,}: {caps.get('empty_rejected', 0)} empty rejected, "
        f"{caps.get('invalid_utf8_replaced', 0)} with invalid UTF-8 replaced; words min {words.get('min')} / "
        f"median {words.get('median')} / max {words.get('max')}"
    )
    tokens = caps.get("tokens")
    if tokens and "error" in tokens:
        out.append(f"          tokens not counted ({tokens['model']}: {tokens['error']})")
    elif tokens:
        out.append(
            f"          tokens ({tokens['model']}) max {tokens['max']}, {tokens['over_context']:,} over the context "
            f"of {tokens['context']} (open_clip truncates them)"
        )
    out += ["", f"{'split':<12}{'images':>9}{'readable':>10}{'captions':>10}"]
    for name, split in report.splits.items():
        out.append(f"{name:<12}{split.images:>9,}{split.readable:>10,}{split.captions:>10,}")
    if report.missing:
        n_lines = sum(len(m["lines"]) for m in report.missing)
        named = f", named by {n_lines} caption line(s)" if n_lines else ""
        out += ["", f"missing image files ({len(report.missing)}{named}):"]
        width = max(len(m["image_id"]) for m in report.missing[:SHOW])
        for item in report.missing[:SHOW]:
            where = f"{item['origin']} {_lines(item['lines'])}".strip()
            out.append(f"  {item['image_id']:<{width}}  {where}")
        out += [f"  ... and {len(report.missing) - SHOW} more"] if len(report.missing) > SHOW else []
    if report.unreadable:
        out += ["", f"unreadable images ({len(report.unreadable)}):"]
        out += [f"  {item['path']}: {item['reason']}" for item in report.unreadable[:SHOW]]
        out += [f"  ... and {len(report.unreadable) - SHOW} more"] if len(report.unreadable) > SHOW else []
    if report.duplicate_ids:
        shown = ", ".join(f"{k} (x{n})" for k, n in list(report.duplicate_ids.items())[:SHOW])
        out += ["", f"duplicate ids ({len(report.duplicate_ids)}): {shown}"]
    if report.orphans:
        shown = ", ".join(report.orphans[:SHOW]) + (", ..." if len(report.orphans) > SHOW else "")
        out += ["", f"image files without captions ({len(report.orphans)}): {shown}"]
    other = [r for r in report.rejects if r.kind != "image"]
    if other:
        out += ["", f"caption and record problems ({len(other)}):"]
        out += [f"  {r.path}{f':{r.line}' if r.line else ''}: {r.reason}" for r in other[:SHOW]]
        out += [f"  ... and {len(other) - SHOW} more"] if len(other) > SHOW else []
    out += ["", f"{len(report.rejects):,} reject(s); checked in {report.seconds:.1f} s"]
    return "\n".join(out)
