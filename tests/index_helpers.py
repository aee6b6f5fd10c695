"""A tiny generated Flickr-layout dataset for the index/search/score tests, and the CLI call they share.

The module-scoped `dataset` fixture (`make_dataset` with 12 images) is in conftest.py, where pytest shares fixtures
across files; a module that needs another size defines its own `dataset`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cli import app

runner = CliRunner()

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def make_dataset(root: Path, n: int = 12, missing: bool = True) -> Path:
    """Flickr layout with `n` drawn 32x32 images and 2 captions each; with `missing`, one caption names no file."""
    lines = []
    names = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        name = f"img{i:03d}.jpg"
        image = Image.new("RGB", (32, 32), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        box = (4 + i % 5, 4, 26, 26 - i % 3)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(16, 4), (4, 28), (28, 28)], fill=COLOURS[colour])
        (root / "images").mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / name)
        names.append(name)
        lines += [f"{name}#0\ta {colour} {shape} number {i}", f"{name}#1\tpicture {i} of a {shape} in {colour}"]
        if missing and i == n // 2:
            lines.append("gone.jpg#0\ta caption for a missing image")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[: n // 2]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[n // 2 :]) + "\n")
    return root


def invoke(args, code: int = 0):
    """Run `mmcross` with `args` (paths are passed as text) and check that it exits with `code`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result
