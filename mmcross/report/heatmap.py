"""Attention heat maps: where each caption word looks in the image, according to the fusion's cross-attention.

How layers and heads are combined: by default the map of a word is the **mean over heads of the last cross layer**
of its text-token -> image-patch attention row (`layer=-1`); `layer=None` averages every cross layer too (no
rollout: the layers' maps are averaged, not multiplied through the residual stream). For the `joint` variant a row
is the image part of the joint attention, so it sums to the share of attention the word gave the image (at most 1);
for `text_to_image` rows sum to 1. Each panel is then scaled to its own minimum and maximum, so panels show *where*
a word looks, not how much: compare words by the `share` values in `WordMap`, not by colour.

Patches lie on a square grid (sqrt(P) x sqrt(P), as for the ViT towers); the map is upsampled bilinearly over the
image as the model saw it (shorter side resized, centre crop), which is how open_clip's eval transform frames it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from mmcross.data.records import blank_caption

SPECIAL = {"<start_of_text>", "<end_of_text>", "[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>"}
LABEL_H = 18  # pixels under each panel for its word
HEADER_H = 40  # pixels above the panels for the caption and the scores
MAX_COLS = 6  # panels per row

# A perceptually ordered black -> purple -> red -> orange -> yellow ramp (anchors of matplotlib's "inferno").
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


@dataclass
class WordMap:
    """The attention of one caption token over the image patches."""

    word: str  # the token's word piece
    position: int  # its position in the tokenized caption
    weights: np.ndarray  # (P,) combined attention over the patches
    share: float  # weights.sum(): the share of its attention that went to the image (joint) or 1 (text_to_image)


@dataclass
class Explanation:
    """What `explain` computed and wrote."""

    itc: float  # dual-encoder cosine
    itm: float  # match probability of the fusion head
    score: float  # ranking score: itm + itc_weight * itc
    words: list[WordMap]
    out: Path | None  # the PNG written
    size: tuple[int, int]  # its (width, height)
    head_trained: bool = True  # False: no run trained the fusion and head, so itm and the maps are random init's
    cut_to: int | None = None  # the context length the caption was cut to (longer than it), else None


def combine_attention(attention: list[torch.Tensor], layer: int | None = -1) -> torch.Tensor:
    """Per-layer (B, H, L, P) maps -> (B, L, P): mean over heads of one cross layer, or of every layer (None)."""
    if not attention:
        raise ValueError("the model returned no cross-attention maps")
    maps = attention if layer is None else [attention[layer]]
    return torch.stack([m.float().mean(dim=1) for m in maps]).mean(dim=0)  # (B, L, P)


def word_maps(
    attention: list[torch.Tensor], text_mask: torch.Tensor, pieces: list[str], layer: int | None = -1
) -> list[WordMap]:
    """The maps of the real, non-special tokens of the first pair in a batch.

    Args:
        attention: per cross layer (B, H, L, P), from `Matcher.match(..., return_attention=True)`.
        text_mask: (B, L) True at real tokens.
        pieces: word pieces of the caption's token ids (at least L of them).
        layer: cross layer to show (negative counts from the last); None averages all layers.
    """
    combined = combine_attention(attention, layer)[0].cpu().numpy()  # (L, P)
    mask = text_mask[0].cpu().numpy().astype(bool)  # (L,)
    real = [i for i in range(combined.shape[0]) if mask[i] and i < len(pieces)]
    words = [i for i in real if pieces[i] not in SPECIAL] or real
    return [WordMap(pieces[i], i, combined[i], float(combined[i].sum())) for i in words]


def patch_grid(n_patches: int) -> int:
    """The side of the square patch grid of P patches; ValueError when P is not a square."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"cannot lay {n_patches} image tokens on a square grid (heat maps need a ViT-style tower)")
    return side


def heatmap_size(n_panels: int, panel: int) -> tuple[int, int]:
    """(width, height) of the PNG `render_heatmap` writes for `n_panels` panels of `panel` pixels."""
    cols = max(1, min(n_panels, MAX_COLS))
    rows = max(1, math.ceil(n_panels / cols))
    return cols * panel, HEADER_H + rows * (panel + LABEL_H)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) on the inferno-like ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).round().astype(np.uint8)


def overlay(image: Image.Image, weights: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """`image` (square, RGB) with a (P,) patch map scaled to [0, 1], upsampled and blended over it."""
    side = patch_grid(weights.size)
    grid = weights.reshape(side, side).astype(np.float32)
    low, high = float(grid.min()), float(grid.max())
    grid = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    up = np.asarray(Image.fromarray(grid, mode="F").resize(image.size, Image.BILINEAR))  # (S, S)
    heat = colorize(up).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).round().clip(0, 255).astype(np.uint8))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_heatmap(
    image: Image.Image, words: list[WordMap], out: str | Path, *, panel: int = 192, header: str = ""
) -> tuple[int, int]:
    """Write a PNG: a header line, then one panel per word (the image with that word's map over it).

    Returns:
        The (width, height) written, `heatmap_size(len(words), panel)`.
    """
    width, height = heatmap_size(len(words), panel)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)  # the default size (10) draws spaces a pixel wide: "runson"
    for i, line in enumerate(header.splitlines()[:2]):
        draw.text((4, 4 + 17 * i), _fit(draw, line, font, width - 8), fill="black", font=font)
    base = ImageOps.fit(image.convert("RGB"), (panel, panel), Image.BICUBIC)
    cols = max(1, min(len(words), MAX_COLS))
    for i, word in enumerate(words):
        x, y = (i % cols) * panel, HEADER_H + (i // cols) * (panel + LABEL_H)
        sheet.paste(overlay(base, word.weights), (x, y))
        label = _fit(draw, f"{word.word} ({word.share:.2f})", font, panel - 4)
        draw.text((x + 2, y + panel + 2), label, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return width, height


@torch.inference_mode()
def explain(
    matcher,
    image: str | Path,
    caption: str,
    out: str | Path | None = None,
    *,
    layer: int | None = -1,
    panel: int = 192,
) -> Explanation:
    """Score one image-caption pair and draw where each caption word attends in the image.

    Args:
        matcher: a `mmcross.model.Matcher`.
        image: the image file.
        caption: the caption.
        out: PNG to write (None: compute only); must end in .png.
        layer: cross layer whose head-mean is shown (default the last); None averages all cross layers.
        panel: side of each panel in pixels.

    An untrained head is not refused (the maps show what a random fusion attends to) but said: in the PNG's header
    and in `Explanation.head_trained`.
    """
    from mmcross.data.images import load_rgb
    from mmcross.encoders import longer_than_context, token_strings

    if out is not None:
        check_png_path(out)
    if blank_caption(caption):
        raise ValueError("empty caption")
    crossing = matcher.cfg.fusion.cross_layers
    if layer is not None and not -crossing <= layer < crossing:
        raise ValueError(f"--layer {layer}: the model has {crossing} cross layers (0 to {crossing - 1}; -1 the last)")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"no image {path}")
    rgb = load_rgb(path)
    was_training = matcher.training
    matcher.eval()
    try:
        ids = matcher.tokenize(caption)  # (1, C)
        scores = matcher.match(matcher.image_encoder.preprocess(rgb)[None], ids, return_attention=True)
    finally:
        matcher.train(was_training)
    pieces = token_strings(matcher.text_encoder.tokenizer, ids[0].tolist())
    words = word_maps(scores.attention, scores.text_mask, pieces, layer)
    itc, itm, score = (float(getattr(scores, name)[0]) for name in ("itc", "itm", "score"))
    size = (0, 0)
    if out is not None:
        how = {None: "mean of all cross layers", -1: "last cross layer"}.get(layer, f"cross layer {layer}")
        untrained = "" if matcher.head_trained else "UNTRAINED HEAD (random init)  "  # first: never cut off
        scores = f"itc {itc:.3f}  itm {itm:.3f}  score {score:.3f}"
        header = f"{caption}\n{untrained}{scores}   ({how}, mean over heads; (share))"
        size = render_heatmap(rgb, words, out, panel=panel, header=header)
    cut, context = longer_than_context(matcher.text_encoder.tokenizer, [caption])
    out = Path(out) if out is not None else None
    return Explanation(itc, itm, score, words, out, size, matcher.head_trained, context if cut else None)


UNTRAINED_NOTE = "untrained head: no run trained the fusion and head; itm, score and the maps are random init's"


def check_png_path(out: str | Path) -> None:
    """Refuse an output that is a folder or not named .png, before any work (the file written is always a PNG)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the PNG file to write, e.g. {out / 'heat.png'}")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: explain writes a PNG, so the name must end in .png (e.g. {out.stem}.png)")
