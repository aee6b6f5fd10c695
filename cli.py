"""The `mmcross` command line: parse options, build a config, call one library function, print."""

from __future__ import annotations

import json
import logging
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


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library log messages.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, force=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:
        # PretrainedUnavailable is a RuntimeError from mmcross.encoders; look it up only when that module is loaded,
        # so commands that need no model (`data ...`) do not pay for importing open_clip.
        encoders = sys.modules.get("mmcross.encoders")
        if isinstance(err, RuntimeError) and (encoders is None or not isinstance(err, encoders.PretrainedUnavailable)):
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


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
    model: str = typer.Option("vit-b-32", "--model", "-m", help=MODEL_HELP),
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the vectors to this .npy file (N, E)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per forward pass."),
) -> None:
    """Embed captions and/or images with the dual encoder: unit vectors, images first, then captions."""
    import numpy as np

    from mmcross.config import parse_set_options
    from mmcross.embed import embed_images, embed_texts
    from mmcross.encoders import load_encoders
    from mmcross.factory import resolve_cfg

    if not text and not image:
        typer.echo("error: give at least one --text or --image", err=True)
        raise typer.Exit(2)
    with user_errors():
        cfg = resolve_cfg(model, pretrained, parse_set_options(set_ or []))
        encoders = load_encoders(cfg.encoder)
        parts = []
        if image:
            parts.append(embed_images(encoders, list(image), batch_size=batch_size))
        if text:
            parts.append(embed_texts(encoders, list(text), batch_size=batch_size))
    vectors = np.concatenate(parts).astype(np.float32)
    if out is not None:
        np.save(out, vectors)
        typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {out}", err=True)
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
_SPLIT = typer.Option(None, "--split", "-s", help="Only this split: train, dev (alias val) or test.")
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
    from mmcross.data.validate import format_report, validate

    with user_errors():
        cfg = _data_cfg(fmt, split, image_root, image_col, caption_col, max_pixels, background)
        report = validate(dataset, cfg, model_name=_tokenizer_model(model), workers=workers, out_dir=out)
    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if as_json else format_report(report))
    if report.failed:
        typer.echo(f"error: {_nothing_read(report.images, split)}", err=True)
        raise typer.Exit(1)
    if strict and report.rejects:
        raise typer.Exit(1)


def _tokenizer_model(name: str) -> str | None:
    """open_clip architecture for a preset name (or an architecture name as given); None for 'none'."""
    from mmcross.config import PRESET_DIR, load_matcher_cfg

    if name.lower() == "none":
        return None
    if (PRESET_DIR / f"{name}.json").is_file():
        return load_matcher_cfg(name).encoder.model_name
    return name


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

    with user_errors():
        cfg = _data_cfg(fmt, split, image_root, image_col, caption_col, max_pixels, background)
        report = convert(dataset, to, out, cfg, shard_size=shard_size, per_caption=per_caption, workers=workers)
    splits = ", ".join(f"{name} {n:,}" for name, n in report.per_split.items())
    typer.echo(f"read {report.records:,} records ({report.format}, {report.reason})")
    typer.echo(f"wrote {report.written:,} images as {report.samples:,} {to} samples to {out} ({splits or 'none'})")
    typer.echo(f"files: {', '.join(report.files)}")
    typer.echo(f"{report.rejects:,} reject(s) -> {report.rejects_path}")
    if report.failed:
        typer.echo(f"error: {_nothing_read(report.records, split)}", err=True)
        raise typer.Exit(1)
    if strict and report.rejects:
        raise typer.Exit(1)


def _nothing_read(records: int, split: str | None) -> str:
    if records == 0:
        return "the dataset has no records" + (f" in split {split!r}" if split else "")
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


if __name__ == "__main__":
    app()
