"""A tiny generated image-caption set for the train/eval tests: coloured shapes, 1 to 3 captions per image."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "bar")


def make_shapes(root: Path, n_train: int = 24, n_dev: int = 8, size: int = 64) -> Path:
    """images/*.png and manifest.jsonl (image, captions, split); returns the manifest path."""
    rows = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(n_train + n_dev):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        img = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        off = (i * 7) % (size // 4)
        box = (off + 8, off + 8, off + size // 2, off + size // 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "bar":
            draw.rectangle((off + 4, off + 20, size - 4, off + 30), fill=COLOURS[colour])
        else:
            draw.rectangle(box, fill=COLOURS[colour])
        name = f"images/{i:03d}.png"
        img.save(root / name)
        captions = [f"a {colour} {shape}", f"one {shape} that is {colour}", f"{colour} {shape} on white"]
        rows.append({"image": name, "captions": captions[: 1 + i % 3], "split": "train" if i < n_train else "dev"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def short_run(manifest: Path, base: dict[str, str] | None = None, **train):
    """A `RunCfg` for a few steps on `manifest` without dev evaluation; `train` sets `train.*` fields."""
    from mmcross.config import load_run_cfg

    fields = {
        "train.data": str(manifest),
        "train.warmup_steps": "1",
        "train.log_every": "1",
        "train.eval_split": "none",
        **(base or {}),
    }
    return load_run_cfg(None, {**fields, **{f"train.{k}": str(v) for k, v in train.items()}})
