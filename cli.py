"""The `mmcross` command line: parse options, build a config, call one library function, print."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

app = typer.Typer(
    help="mmcross: image-text matching from the shell (open_clip dual encoder + cross-attention re-ranking).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = "Architecture preset (see `mmcross models`) or a JSON config file."
PRETRAINED_HELP = "Weights: an open_clip tag (e.g. laion2b_s34b_b79k), a local checkpoint file, or hf-hub:org/repo."
SET_HELP = "Override a config field, e.g. --set fusion.cross_layers=3 (repeatable)."
# commands that take --checkpoint: no --model means vit-b-32, or the checkpoint's own; a different one is refused
_MODEL = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: vit-b-32, or the checkpoint's own.")
CHECKPOINT_HELP = "A mmcross checkpoint (.safetensors) or a training run directory (its best, else last checkpoint)."
_ALLOW_UNTRAINED = typer.Option(
    False, "--allow-untrained-head", help="Use the fusion head's ITM scores even if no training run trained it."
)
# how the encoders run (mmcross.fast): every command that encodes takes these two
_PRECISION = typer.Option(
    "fp32",
    "--precision",
    # `\[` keeps rich (typer's help renderer) from reading "[fast]" as a style tag and dropping it
    help="Encoders in fp32 (exact) or int8 (faster on a CPU; needs the fast extra: pip install -e '.\\[fast]').",
)
_RUNTIME = typer.Option(
    "auto", "--runtime", help="torch, onnx (ONNX Runtime) or openvino; auto: torch for fp32, onnx for int8."
)


def _inference(precision: str, runtime: str):
    from mmcross.config import InferenceCfg

    return InferenceCfg(precision=precision, runtime=runtime)


# every long command shows progress on stderr: a bar on a terminal, a plain line every ~30 s in a log file
_QUIET = typer.Option(False, "--quiet", help="Show no progress on stderr (bar on a terminal, lines in a log).")


def _ref(model: str | None, pretrained: str | None, checkpoint: Path | None, set_: list[str] | None):
    """The model reference of a command's model options (`mmcross.config.ModelRef`); with none of --model,
    --pretrained and --checkpoint, a note that the default preset's towers are random-init (its numbers mean
    nothing, and nothing else would tell the user so)."""
    from mmcross.config import DEFAULT_MODEL, ModelRef, parse_set_options

    if model is None and pretrained is None and checkpoint is None:
        typer.echo(
            f"note: no --checkpoint, --pretrained or --model: {DEFAULT_MODEL} with random-init weights, whose "
            "vectors and rankings mean nothing; pass --checkpoint RUN_DIR (a training run) or --pretrained WEIGHTS",
            err=True,
        )
    return ModelRef(
        model=model,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        overrides=parse_set_options(set_ or []),
    )


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library log messages.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, force=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit status 2 (1: nothing could be read at all)."""
    from mmcross.data.records import NothingReadable

    try:
        yield
    except NothingReadable as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as err:
        # a path the user gave that cannot be written (an unwritable MMCROSS_CACHE, a file where a folder goes)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:
        # PretrainedUnavailable is a RuntimeError from mmcross.encoders; look it up only when that module is loaded,
        # so commands that need no model (`data ...`) do not pay for importing open_clip.
        encoders = sys.modules.get("mmcross.encoders")
        if isinstance(err, RuntimeError) and (encoders is None or not isinstance(err, encoders.PretrainedUnavailable)):
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _refuse_folders(**outputs: Path | None) -> None:
    """Refuse an output file option that could not be written, before any work (it would fail at the end, after
    the work): an existing folder, or a path under a file."""
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"--{option} {path} is a folder; give a file name")
        blocking = _file_in_the_way(path.parent)
        if blocking is not None:
            raise ValueError(f"--{option} {path}: {blocking} is a file, not a folder")


def _file_in_the_way(folder: Path) -> Path | None:
    """The existing file at `folder` or above it that would stop the folder from being made, if any."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the architecture presets: encoder, embedding size, parameter count."""
    from dataclasses import asdict

    from mmcross.factory import list_models

    infos = list_models()
    if as_json:
        typer.echo(json.dumps([asdict(info) for info in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("preset", "encoder", "embed dim", "params", "description")
    for info in infos:
        table.add_row(info.name, info.encoder, str(info.embed_dim), f"{info.params / 1e6:.1f}M", info.description)
    Console(width=max(120, Console().width)).print(table)


@app.command()
def embed(
    text: list[str] | None = typer.Option(None, "--text", "-t", help="A caption to embed (repeatable)."),
    image: list[Path] | None = typer.Option(None, "--image", "-i", help="An image file to embed (repeatable)."),
    model: str | None = _MODEL,
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the vectors to this .npy file (N, E)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per forward pass."),
    precision: str = _PRECISION,
    runtime: str = _RUNTIME,
    quiet: bool = _QUIET,
) -> None:
    """Embed captions and/or images with the dual encoder: unit vectors, images first, then captions."""
    from mmcross.encode import embed as embed_items
    from mmcross.encode import npy_path, refuse_empty_captions
    from mmcross.factory import load_matcher

    if not text and not image:
        typer.echo("error: give at least one --text or --image", err=True)
        raise typer.Exit(2)
    with user_errors():
        _refuse_folders(out=out)
        # before the model loads (an int8 first run converts the towers for seconds): what cannot be embedded
        refuse_empty_captions(text or [])
        missing = next((path for path in image or [] if not Path(path).is_file()), None)
        if missing is not None:
            raise ValueError(f"cannot read image {missing}: missing file")
        matcher = load_matcher(_ref(model, pretrained, checkpoint, set_), inference=_inference(precision, runtime))
        vectors = embed_items(
            matcher,
            images=list(image or []),
            captions=list(text or []),
            batch_size=batch_size,
            out=out,
            progress=not quiet,
        )
    if out is not None:
        typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {npy_path(out)}", err=True)
        return
    inputs = [("image", str(p)) for p in image or []] + [("text", t) for t in text or []]
    for (kind, value), vector in zip(inputs, vectors):
        sys.stdout.write(json.dumps({kind: value, "embedding": [round(float(x), 6) for x in vector]}) + "\n")


data_app = typer.Typer(
    help="Datasets: check one (`validate`) or rewrite it as a JSONL manifest, open_clip CSVs or webdataset shards.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

DATASET_HELP = "A dataset folder or file, or a webdataset shard pattern such as 'shards/{000000..000009}.tar'."
FORMAT_HELP = "auto, flickr, karpathy, coco, table, folder or wds (auto detects the layout and says which)."


def _data_cfg(fmt, split, image_root, image_col, caption_col, max_pixels, background):
    """DataCfg from the shared `data` options."""
    from mmcross.config import DataCfg

    parts = [p.strip() for p in background.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ValueError(f"--background expects R,G,B with values 0-255, got {background!r}")
    return DataCfg(
        format=fmt,
        split=split,
        image_root=str(image_root) if image_root else None,
        image_col=image_col,
        caption_col=caption_col,
        max_image_pixels=max_pixels,
        background=tuple(int(p) for p in parts),
    )


_FORMAT = typer.Option("auto", "--format", "-f", help=FORMAT_HELP)
_SPLIT = typer.Option(None, "--split", "-s", help="Only this split: train, dev (val), test, or all (the default).")
_IMAGE_ROOT = typer.Option(None, "--image-root", help="Folder that relative image paths resolve against.")
_IMAGE_COL = typer.Option(None, "--image-col", help="Table column with image paths (default: image, filepath, ...).")
_CAPTION_COL = typer.Option(None, "--caption-col", help="Table column with captions (default: caption, title, ...).")
_MAX_PIXELS = typer.Option(89_478_485, "--max-pixels", min=1, help="Refuse images with more pixels (bomb guard).")
_BACKGROUND = typer.Option("255,255,255", "--background", help="R,G,B that transparent pixels are composited on.")
_WORKERS = typer.Option(None, "--workers", "-j", min=0, help="Decoding processes (default: one per core; 0: none).")
_STRICT = typer.Option(False, "--strict", help="Exit 1 when anything was rejected.")


@data_app.command("validate")
def data_validate(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    fmt: str = _FORMAT,
    split: str | None = _SPLIT,
    image_root: Path | None = _IMAGE_ROOT,
    image_col: str | None = _IMAGE_COL,
    caption_col: str | None = _CAPTION_COL,
    max_pixels: int = _MAX_PIXELS,
    background: str = _BACKGROUND,
    model: str = typer.Option(
        "vit-b-32", "--model", "-m", help="Preset or open_clip architecture whose tokenizer counts tokens; 'none'."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write rejects.jsonl and report.json to this folder."),
    workers: int | None = _WORKERS,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    strict: bool = _STRICT,
) -> None:
    """Check a dataset: read every record and decode every image.

    Prints images and captions per split, missing and unreadable files, duplicate ids, caption problems and
    lengths. Exits 0 unless --strict finds rejects or nothing at all could be read.
    """
    from mmcross.config import tokenizer_architecture
    from mmcross.data.validate import format_report, validate

    with user_errors():
        cfg = _data_cfg(fmt, split, image_root, image_col, caption_col, max_pixels, background)
        report = validate(dataset, cfg, model_name=tokenizer_architecture(model), workers=workers, out_dir=out)
    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if as_json else format_report(report))
    if report.failed:
        typer.echo(f"error: {_nothing_read(report.images, split, report.why_empty)}", err=True)
        raise typer.Exit(1)
    if strict and report.rejects:
        raise typer.Exit(1)


@data_app.command("convert")
def data_convert(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    to: str = typer.Option(..., "--to", "-t", help="jsonl (manifest), csv (open_clip CSVs) or wds (tar shards)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (rejects.jsonl is written there too)."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per webdataset shard."),
    per_caption: bool = typer.Option(False, "--per-caption", help="wds: a sample per caption (for open_clip)."),
    fmt: str = _FORMAT,
    split: str | None = _SPLIT,
    image_root: Path | None = _IMAGE_ROOT,
    image_col: str | None = _IMAGE_COL,
    caption_col: str | None = _CAPTION_COL,
    max_pixels: int = _MAX_PIXELS,
    background: str = _BACKGROUND,
    workers: int | None = _WORKERS,
    strict: bool = _STRICT,
) -> None:
    """Rewrite a dataset as a JSONL manifest, open_clip CSVs or webdataset shards.

    Every mmcross command and open_clip's trainer read the result. Unusable images go to OUT/rejects.jsonl; exits 0
    unless --strict finds rejects or nothing at all could be read.
    """
    from mmcross.data.convert import convert
    from mmcross.data.images import WHITE

    with user_errors():
        cfg = _data_cfg(fmt, split, image_root, image_col, caption_col, max_pixels, background)
        report = convert(dataset, to, out, cfg, shard_size=shard_size, per_caption=per_caption, workers=workers)
    splits = ", ".join(f"{name} {n:,}" for name, n in report.per_split.items())
    typer.echo(f"read {report.records:,} records ({report.format}, {report.reason})")
    typer.echo(f"wrote {report.written:,} images as {report.samples:,} {to} samples to {out} ({splits or 'none'})")
    typer.echo(f"files: {', '.join(report.files)}")
    if report.referenced and tuple(cfg.background) != WHITE:
        typer.echo(
            f"note: --background was not applied to the {report.referenced:,} image(s) written as paths to their "
            "files, unchanged (it composites only the images this command writes: shards, or images read as bytes)"
        )
    typer.echo(f"{report.rejects:,} reject(s) -> {report.rejects_path}")
    if report.failed:
        typer.echo(f"error: {_nothing_read(report.records, split, report.why_empty)}", err=True)
        raise typer.Exit(1)
    if strict and report.rejects:
        raise typer.Exit(1)


def _nothing_read(records: int, split: str | None, why_empty: str = "") -> str:
    if records == 0:
        return why_empty or "the dataset has no records" + (f" in split {split!r}" if split else "")
    return "no image could be read (see the rejects)"


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to create: images/ and manifest.jsonl."),
    n_images: int = typer.Option(2000, "--n-images", "-n", min=1, help="Images to draw."),
    seed: int = typer.Option(0, "--seed", help="Generation seed: the same seed gives the same bytes."),
    image_size: int = typer.Option(64, "--image-size", min=16, help="Image side in pixels."),
    holdout: list[str] | None = typer.Option(
        None,
        "--holdout",
        help='A "COLOUR SHAPE" combination kept out of train and dev, e.g. "red circle" (repeatable).',
    ),
) -> None:
    """Generate the compositional shapes set: captions with relations and a swapped hard negative for each."""
    from mmcross.data.synth import write_synth

    with user_errors():
        summary = write_synth(out, n_images=n_images, seed=seed, image_size=image_size, holdout=holdout)
    splits = ", ".join(f"{split} {count}" for split, count in summary.images.items())
    typer.echo(f"wrote {sum(summary.images.values())} images ({splits}), {summary.captions} captions to {out}")
    if summary.holdout:
        typer.echo(f"held out of train and dev: {', '.join(summary.holdout)}")


# ---- index, search, score ----------------------------------------------------------------------------------------


@app.command()
def index(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder (img_emb/, text_emb/, metadata/, manifest.json)."),
    fmt: str = _FORMAT,
    split: str | None = _SPLIT,
    image_root: Path | None = _IMAGE_ROOT,
    image_col: str | None = _IMAGE_COL,
    caption_col: str | None = _CAPTION_COL,
    model: str | None = _MODEL,
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    images: bool = typer.Option(True, "--images/--no-images", help="Embed the images."),
    captions: bool = typer.Option(True, "--captions/--no-captions", help="Embed the captions."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass (captions: 4x)."),
    workers: int = typer.Option(2, "--workers", "-j", min=0, help="DataLoader decoding processes (0: none)."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Records per shard (the unit of --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted job in OUT (done shards are kept)."),
    append: bool = typer.Option(False, "--append", help="Add the records OUT does not hold yet, in new shards."),
    cache_tokens: bool = typer.Option(
        True, "--cache-tokens/--no-cache-tokens", help="Store encoder tokens for --rerank (float16)."
    ),
    faiss: str = typer.Option("none", "--faiss", help="Also build a faiss index: none, flat, ivf or hnsw."),
    rank: int | None = typer.Option(None, "--rank", min=0, help="This process's rank (default: $RANK, else 0)."),
    world_size: int | None = typer.Option(
        None, "--world-size", min=1, help="Processes sharing the job (default: $WORLD_SIZE, else 1)."
    ),
    precision: str = _PRECISION,
    runtime: str = _RUNTIME,
    quiet: bool = _QUIET,
) -> None:
    """Embed a dataset into an index folder in clip-retrieval's layout, with a token cache for re-ranking."""
    from mmcross.config import DataCfg
    from mmcross.factory import load_matcher
    from mmcross.index.build import BuildOptions, build_index

    with user_errors():
        root = str(image_root) if image_root else None
        data_cfg = DataCfg(format=fmt, split=split, image_root=root, image_col=image_col, caption_col=caption_col)
        ref = _ref(model, pretrained, checkpoint, set_)
        opts = BuildOptions(
            images=images,
            captions=captions,
            batch_size=batch_size,
            workers=workers,
            cache_tokens=cache_tokens,
            shard_size=shard_size,
            faiss=faiss,
            resume=resume,
            append=append,
            rank=rank,
            world_size=world_size,
            progress=not quiet,
        )
        matcher = load_matcher(ref, inference=_inference(precision, runtime))
        report = build_index(dataset, out, matcher, data_cfg, opts, ref)
    who = f"rank {report.rank}/{report.world_size}: " if report.world_size > 1 else ""
    typer.echo(
        f"{who}wrote {report.shards_written} shard(s) to {out} ({report.format}), "
        f"{report.images_per_s:.1f} images/s over {report.seconds:.1f}s"
    )
    if report.complete:
        typer.echo(f"index: {report.images:,} images, {report.captions:,} captions, {report.rejects:,} reject(s)")
    for note in report.notes:
        typer.echo(note)


@app.command()
def search(
    index_dir: Path = typer.Argument(..., help="An index folder written by `mmcross index`."),
    text: str | None = typer.Option(None, "--text", "-t", help="A caption to search with."),
    image: Path | None = typer.Option(None, "--image", "-i", help="An image file to search with."),
    queries: Path | None = typer.Option(
        None, "--queries", "-q", help='Many queries: a text file (one caption a line) or JSONL {"text"|"image": ...}.'
    ),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Hits per query."),
    rerank: int = typer.Option(0, "--rerank", min=0, help="Re-rank the dual encoder's top K with the fusion head."),
    target: str = typer.Option("images", "--target", help="What to search: images or captions."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: the index's model."),
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP + " Applies to the index's model too."),
    backend: str = typer.Option("auto", "--backend", help="auto (faiss where the index has one), exact or faiss."),
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="IVF lists to visit (faiss ivf only)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    html: Path | None = typer.Option(
        None, "--html", help="Also write the hits as one self-contained HTML page (embedded thumbnails) here."
    ),
    allow_untrained_head: bool = _ALLOW_UNTRAINED,
    precision: str | None = typer.Option(
        None, "--precision", help="Query encoders in fp32 or int8 (default: as the index was built)."
    ),
    runtime: str | None = typer.Option(
        None, "--runtime", help="torch, onnx or openvino for the queries (default: as the index was built; auto)."
    ),
) -> None:
    """Search an index by caption or image: dual-encoder top-k, optionally re-ranked by the fusion head.

    Scores: itc is the dual-encoder cosine; with --rerank, itm is the match probability and score = itm +
    itc_weight * itc (what hits are ranked by); without it, score = itc. --rerank needs a trained fusion head (a
    checkpoint of `mmcross train`); an untrained one is refused unless --allow-untrained-head.
    """
    from mmcross.config import parse_set_options
    from mmcross.retrieval import Query, dataset_root, read_queries, search_index

    if sum(x is not None for x in (text, image, queries)) != 1:
        typer.echo("error: give exactly one of --text, --image or --queries", err=True)
        raise typer.Exit(2)
    with user_errors():
        _refuse_folders(html=html)
        named = any(x is not None for x in (model, pretrained, checkpoint))  # else: the model that built the index
        qs = read_queries(queries) if queries else [Query(text=text, image=str(image) if image else None)]
        # what is not given is the index's (search_index fills it in)
        chosen = None if (precision, runtime) == (None, None) else _inference(precision, runtime)
        results = search_index(
            index_dir,
            qs,
            ref=_ref(model, pretrained, checkpoint, None) if named else None,
            overrides=parse_set_options(set_ or []),
            target=target,
            k=k,
            rerank=rerank,
            backend=backend,
            nprobe=nprobe,
            html=html,
            allow_untrained_head=allow_untrained_head,
            inference=chosen,
        )
        root = dataset_root(index_dir)
    if not queries and results[0].reject:
        typer.echo(f"error: {results[0].reject}", err=True)
        raise typer.Exit(2)
    for number, answer in enumerate(results, 1):
        if answer.reject:
            typer.echo(f"reject: query {number} ({answer.query.label}): {answer.reject}", err=True)
    if as_json:
        payload = [answer.to_dict() for answer in results]
        typer.echo(json.dumps(payload if queries else payload[0], indent=2, ensure_ascii=False))
    else:
        _print_hits(results, target, root)
    if all(answer.reject for answer in results):
        typer.echo("error: no query could be searched (see the rejects above)", err=True)
        raise typer.Exit(1)


def _print_hits(results, target: str, root: Path) -> None:
    """One table per query: image paths relative to the dataset root, shown whole (folded on a narrow terminal,
    never cut), captions wrapped; the id column only where an id is not the path's end (COCO ids, for example)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mmcross.retrieval import short_path

    console = Console()
    if not console.is_terminal:  # a file or a pipe: whole lines, nothing folded
        console = Console(width=100_000)
    for answer in results:
        if answer.reject:
            continue
        paths = [short_path(h.path, root) for h in answer.hits]
        show_id = any(not p.endswith(h.image_id) for p, h in zip(paths, answer.hits))
        table = Table(title=escape(answer.query.label))  # user text is shown as typed, never read as rich markup
        for name in ("rank", "score", "itc", "itm"):
            table.add_column(name, justify="right", no_wrap=True)
        if show_id:
            table.add_column("id", overflow="fold")
        table.add_column("image", overflow="fold")
        if target == "captions":
            table.add_column("caption", overflow="fold")
        for h, path in zip(answer.hits, paths):
            itm = "-" if h.itm is None else f"{h.itm:.3f}"
            cells = [str(h.rank), f"{h.score:.3f}", f"{h.itc:.3f}", itm, *([h.image_id] if show_id else []), path]
            cells += [h.caption or ""] if target == "captions" else []
            table.add_row(*map(escape, cells))
        console.print(table)


@app.command()
def score(
    pairs: Path = typer.Argument(..., help="Image-caption pairs: CSV, TSV, JSONL or Parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.csv, .tsv, .jsonl or .parquet): input + scores."),
    model: str | None = _MODEL,
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    image_root: Path | None = typer.Option(None, "--image-root", help="Folder relative image paths resolve against."),
    image_col: str | None = _IMAGE_COL,
    caption_col: str | None = _CAPTION_COL,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Rows per forward pass (and per read)."),
    precision: str = _PRECISION,
    runtime: str = _RUNTIME,
    quiet: bool = _QUIET,
    allow_untrained_head: bool = _ALLOW_UNTRAINED,
) -> None:
    """Score every image-caption pair of a table: adds input_row, itc, itm, score and reason columns, in order.

    itc is the dual-encoder cosine, itm the fusion head's match probability, score = itm + itc_weight * itc. Rows
    that cannot be scored (missing image, empty caption) keep empty scores and say why in `reason`; with an
    untrained head (no --checkpoint) itm and score stay empty with reason "untrained head" (itc is kept). A caption
    cell holding a list (e.g. the `captions` of a JSONL manifest) gives one output row per caption, with its input_row.
    Columns and the CSV delimiter are detected as every command detects them; invalid UTF-8 is replaced and counted.
    """
    from mmcross.factory import load_matcher
    from mmcross.scoring import score_pairs

    with user_errors():
        _refuse_folders(out=out)
        matcher = load_matcher(_ref(model, pretrained, checkpoint, set_), inference=_inference(precision, runtime))
        report = score_pairs(
            pairs,
            out,
            matcher,
            image_root=image_root,
            image_col=image_col,
            caption_col=caption_col,
            batch_size=batch_size,
            progress=not quiet,
            allow_untrained_head=allow_untrained_head,
        )
    if not report.head:
        typer.echo(
            "note: the match head is untrained (no training run trained it): itc written, itm and score left empty "
            "(reason 'untrained head'); pass --checkpoint RUN_DIR, or --allow-untrained-head",
            err=True,
        )
    rows_note = f" from {report.rows:,} input rows" if report.written != report.rows else ""
    done = f"scored {report.scored:,}" if report.head else f"itc for {report.with_itc:,}"
    typer.echo(
        f"{done} of {report.written:,} pairs{rows_note} -> {out} ({report.bad:,} with a reason; "
        f"image column {report.image_col!r}, caption column {report.caption_col!r})"
    )
    if report.stats.invalid_utf8:
        typer.echo(f"note: {report.stats.invalid_utf8:,} cell(s) of invalid UTF-8 replaced by U+FFFD", err=True)
    if report.cut:
        typer.echo(
            f"note: {report.cut:,} caption(s) longer than the model's {report.context} tokens were scored on the "
            "part that fits (the rest is cut, as the text tower's context requires)",
            err=True,
        )
    shown = 10  # malformed input rows: written with their input_row and reason only; the output lists them all
    for reject in report.stats.rejects[:shown]:
        where = reject.path if reject.line is None else f"{reject.path}:{reject.line}"
        typer.echo(f"note: {where}: {reject.reason} (written with its input_row and reason, no scores)", err=True)
    if len(report.stats.rejects) > shown:
        more = len(report.stats.rejects) - shown
        typer.echo(f"note: {more:,} more malformed row(s), each in {out} with its input_row and reason", err=True)


@app.command()
def explain(
    image: Path = typer.Argument(..., help="The image file."),
    caption: str = typer.Argument(..., help="The caption to match against it."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write: one heat-map panel per caption word."),
    model: str | None = _MODEL,
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    layer: int | None = typer.Option(
        None, "--layer", help="Cross layer to show, mean over its heads (default and -1: the last)."
    ),
    all_layers: bool = typer.Option(False, "--all-layers", help="Average the maps of every cross layer."),
    panel: int = typer.Option(192, "--panel", min=32, help="Side of each panel in pixels."),
) -> None:
    """Show where each caption word attends in the image (fusion cross-attention) and print itc, itm and score.

    Each panel is the mean over heads of the last cross layer's attention of one word over the image patches,
    scaled to its own range; the number beside the word is the share of its attention that went to the image.
    """
    from mmcross.factory import load_matcher
    from mmcross.report.heatmap import UNTRAINED_NOTE, check_png_path
    from mmcross.report.heatmap import explain as explain_pair

    with user_errors():
        if all_layers and layer is not None:
            raise ValueError("--layer shows one cross layer, --all-layers the mean of all: give one of them")
        _refuse_folders(out=out)
        check_png_path(out)  # before the model loads
        matcher = load_matcher(_ref(model, pretrained, checkpoint, set_))
        layer = None if all_layers else (-1 if layer is None else layer)
        result = explain_pair(matcher, image, caption, out, layer=layer, panel=panel)
    if result.cut_to:
        typer.echo(
            f"note: the caption is longer than the model's {result.cut_to} tokens; the part that fits is shown",
            err=True,
        )
    untrained = "" if result.head_trained else "  (untrained head)"
    typer.echo(f"itc {result.itc:.4f}  itm {result.itm:.4f}  score {result.score:.4f}{untrained}")
    if not result.head_trained:
        typer.echo(f"warning: {UNTRAINED_NOTE}; pass --checkpoint RUN_DIR for a trained one", err=True)
    typer.echo(f"wrote {len(result.words)} panels ({result.size[0]}x{result.size[1]}) to {out}", err=True)


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config YAML (configs/*.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, optimiser state, log.jsonl."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a run-config field, e.g. --set train.max_steps=100 or --set fusion.dim=64."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress on stderr (--quiet: none)."),
    quiet: bool = _QUIET,
) -> None:
    """Fine-tune a matcher with ITC + ITM hard negatives (+ VSE++); `torchrun` runs it with DDP.

    Writes the run directory (see `mmcross.train`) and loss.png, the loss curve of its log.jsonl.
    """
    from mmcross.config import parse_set_options
    from mmcross.train import train_from_config

    with user_errors():
        overrides = parse_set_options(set_ or [])
        blocking = _file_in_the_way(out)
        if blocking is not None:
            raise ValueError(f"--out {out} is the run's folder, but {blocking} is a file")
        result = train_from_config(config, out, overrides, resume=resume, progress=progress and not quiet)
    # under torchrun rank 0 says what the run did, once (its RANK alone: the process group is gone by now)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "stopped_by": result.stopped_by,
        "rejects": result.rejects,
        "seconds": round(result.seconds, 1),
    }
    if result.resumed_with:  # --set changed these on --resume: the steps from there are neither config's
        summary["resumed_with"] = result.resumed_with
    if result.rejects:
        summary["rejects_file"] = str(result.run_dir / "rejects.jsonl")
    if result.loss_curve is not None:
        summary["loss_curve"] = str(result.loss_curve)
    if result.eval is not None:
        summary["best_rsum"] = result.best
        summary["metrics"] = result.eval["metrics"]
        summary["rerank_metrics"] = result.eval["rerank_metrics"]
    typer.echo(json.dumps(summary, indent=2))


@app.command("eval")
def eval_(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    fmt: str = _FORMAT,
    split: str = typer.Option(
        "test", "--split", "-s", help="Split to evaluate: train, dev (val), test, or all (every record, split or not)."
    ),
    image_root: Path | None = _IMAGE_ROOT,
    image_col: str | None = _IMAGE_COL,
    caption_col: str | None = _CAPTION_COL,
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="A .safetensors checkpoint, or a run directory (its best, else last)."
    ),
    model: str | None = _MODEL,
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    rerank: int | None = typer.Option(
        None, "--rerank", "-k", min=0, help="Re-rank each query's top K by the fusion (default 16; 0 if untrained)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the results JSON here too, and its recall@K curve beside it (.png)."
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Write the worst failures (true match ranked lowest, what ranked above) as HTML here."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", "-j", min=0, help="Image decoding processes (0: none)."),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="Evaluate on the first N images only."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    hard_negatives: bool = typer.Option(
        False,
        "--hard-negatives",
        help="Also: is each caption scored above its swapped negative? (synth manifests; needs a trained head)",
    ),
    allow_untrained_head: bool = _ALLOW_UNTRAINED,
    precision: str = _PRECISION,
    runtime: str = _RUNTIME,
    quiet: bool = _QUIET,
) -> None:
    """Recall@1/5/10 both ways, median rank and rsum: dual encoder, and after fusion re-rank of its top K."""
    from mmcross.config import DataCfg
    from mmcross.evaluate import run_eval

    with user_errors():
        _refuse_folders(out=out, html=html)
        if out is not None and out.suffix.lower() == ".png":  # the recall plot goes to OUT with .png: it would
            raise ValueError(f"--out {out} is the JSON report; its recall plot is written beside it as .png")
        report = run_eval(
            dataset,
            DataCfg(
                format=fmt,
                split=split,
                image_root=str(image_root) if image_root else None,
                image_col=image_col,
                caption_col=caption_col,
            ),
            _ref(model, pretrained, checkpoint, set_),
            k=rerank,
            batch_size=batch_size,
            workers=workers,
            max_images=max_images,
            device=device,
            out=out,
            html=html,
            hard_negatives=hard_negatives,
            allow_untrained_head=allow_untrained_head,
            progress=not quiet,
            inference=_inference(precision, runtime),
        )
    if report.get("rerank_skipped"):
        typer.echo("note: the match head is untrained, so only the dual encoder was evaluated (no re-rank)", err=True)
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    app()
