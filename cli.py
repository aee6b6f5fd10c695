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
    from mmcross.encoders import PretrainedUnavailable

    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError, PretrainedUnavailable) as err:
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


if __name__ == "__main__":
    app()
