"""A compositional synthetic dataset: coloured shapes, relational captions, and swapped hard negatives.

Each image holds one to three objects (shape, colour, size) placed in distinct cells of a 3x3 grid. Captions name
every object ("a red circle") and up to two relations between two of them ("a red circle left of a blue square",
"above", "bigger than"). Each caption has a hard negative that is false for its image but uses the same words: the two
objects' attributes swapped ("a blue circle left of a red square"), or the relation's arguments swapped ("a blue
square left of a red circle"); a one-object caption gets another colour. A dual encoder that sees a bag of words
cannot tell such pairs apart; a cross-attention head that binds words to regions can.

`holdout` combinations ("red circle") never occur in train or dev: every image containing one goes to test, so
test measures compositional generalisation. Generation is deterministic for a seed (same bytes).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SIZES = ("small", "big")
RELATIONS = ("left of", "above", "bigger than")  # one per axis, see `_relations`
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
BACKGROUND = (245, 245, 245)
MANIFEST = "manifest.jsonl"
SYNTH_PARAMS = "synth.json"  # how the set was generated, held-out combinations included
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}  # for images without a held-out combination


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    row: int  # grid row, 0 = top
    col: int  # grid column, 0 = left

    def phrase(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass
class SynthItem:
    image_id: str
    png: bytes
    captions: list[str]
    negatives: list[str | None]  # negatives[i] is the hard negative of captions[i]; None where no false one exists
    split: str
    objects: list[Thing] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)  # every caption of the grammar true of the image


def parse_holdout(combo: str) -> tuple[str, str]:
    """ "red circle" -> ("red", "circle"), checked against the known colours and shapes."""
    words = combo.lower().split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(f"--holdout expects 'COLOUR SHAPE' with colour in {sorted(COLOURS)} and shape in {SHAPES}")
    return words[0], words[1]


def _draw(objects: list[Thing], image_size: int) -> bytes:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for thing in objects:
        half = cell * (0.45 if thing.size == "big" else 0.25)
        cx, cy = (thing.col + 0.5) * cell, (thing.row + 0.5) * cell
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif thing.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _relations(a: Thing, b: Thing) -> list[str]:
    """Relations that hold from a to b.

    One word per axis ("left of", not also "right of"): with both a relation and its inverse, "a red circle left of
    a blue square" is true and "a blue square left of a red circle" false, but "a blue square right of a red
    circle" true again, so neither word order nor relation word says anything alone about the label (a parity of
    the two) and gradient descent found no foothold: a fusion trained on such pairs could not even memorise 64 of
    them. With one direction per axis the order of the two objects is the signal.
    """
    found = []
    if a.col < b.col:
        found.append("left of")
    if a.row < b.row:
        found.append("above")
    if a.size == "big" and b.size == "small":
        found.append("bigger than")
    return found


def _holds(objects: list[Thing], caption: tuple) -> bool:
    """Whether a caption (as a tuple) is true of the scene."""
    if caption[0] == "one":
        _, colour, shape = caption
        return any(t.colour == colour and t.shape == shape for t in objects)
    _, (ca, sa), relation, (cb, sb) = caption
    return any(
        relation in _relations(a, b)
        for a in objects
        for b in objects
        if a is not b and (a.colour, a.shape) == (ca, sa) and (b.colour, b.shape) == (cb, sb)
    )


def _text(caption: tuple) -> str:
    if caption[0] == "one":
        return f"a {caption[1]} {caption[2]}"
    _, (ca, sa), relation, (cb, sb) = caption
    return f"a {ca} {sa} {relation} a {cb} {sb}"


def _mentions(caption: tuple, combos: set[tuple[str, str]]) -> bool:
    if caption[0] == "one":
        return (caption[1], caption[2]) in combos
    return caption[1] in combos or caption[3] in combos


def _negative(objects: list[Thing], caption: tuple, rng: random.Random, banned: set, used: set) -> tuple | None:
    """A false caption with the caption's words rearranged (attribute or argument swap); None if none exists.

    Negatives never mention a `banned` (held-out) combination, so train text never contains one, and are not among
    the image's `used` negatives, so every negative of an image belongs to one caption.
    """
    if caption[0] == "one":
        colours = [
            c
            for c in COLOURS
            if not _holds(objects, ("one", c, caption[2]))
            and (c, caption[2]) not in banned
            and ("one", c, caption[2]) not in used
        ]
        # Prefer a colour that another object of the scene has: "a blue square" for a scene with a red square and a
        # blue circle is false only because of how colour and shape are bound; an absent colour is a bag-of-words test.
        bound = [c for c in colours if any(t.colour == c for t in objects)]
        return ("one", rng.choice(bound or colours), caption[2]) if colours else None
    _, (ca, sa), relation, (cb, sb) = caption
    options = [
        ("rel", (cb, sa), relation, (ca, sb)),  # colours swapped between the two objects
        ("rel", (cb, sb), relation, (ca, sa)),  # arguments of the relation swapped
    ]
    rng.shuffle(options)
    for option in options:
        if option != caption and option not in used and not _holds(objects, option) and not _mentions(option, banned):
            return option
    return None


def _scene(rng: random.Random) -> list[Thing]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(1, 3))
    objects: list[Thing] = []
    for row, col in cells:
        while True:  # objects in one scene differ in colour or shape, so every phrase names one object
            thing = Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), row, col)
            if all((thing.colour, thing.shape) != (o.colour, o.shape) for o in objects):
                break
        objects.append(thing)
    return objects


def _relational(objects: list[Thing]) -> list[tuple]:
    """Every relational caption (as a tuple) that holds between two objects of the scene."""
    return [
        ("rel", (a.colour, a.shape), r, (b.colour, b.shape))
        for a in objects
        for b in objects
        if a is not b
        for r in _relations(a, b)
    ]


def _statements(objects: list[Thing]) -> list[str]:
    """Every caption of the grammar that is true of the scene: each object, each relation between two of them."""
    return [_text(("one", t.colour, t.shape)) for t in objects] + [_text(c) for c in _relational(objects)]


def _captions(objects: list[Thing], rng: random.Random, relations: int) -> list[tuple]:
    """Every object's own caption, then up to `relations` relational captions.

    Listing every object means an image's captions say which one-object captions are true of it, so training can
    tell "a red square" written for another scene with a red square from a negative (`mmcross.losses`, `known`).
    """
    single: list[tuple] = [("one", t.colour, t.shape) for t in objects]
    relational = _relational(objects)
    rng.shuffle(single)
    rng.shuffle(relational)
    return single + relational[:relations]


def generate(
    n_images: int, seed: int = 0, image_size: int = 64, holdout: list[str] | None = None, relations_per_image: int = 2
) -> list[SynthItem]:
    """Generate `n_images` scenes with captions, hard negatives and splits, deterministically for `seed`."""
    held = {parse_holdout(combo) for combo in holdout or []}
    rng = random.Random(seed)
    items = []
    for index in range(n_images):
        objects = _scene(rng)
        if any((t.colour, t.shape) in held for t in objects):
            split = "test"
        else:
            draw = rng.random()
            split = (
                "train" if draw < SPLIT_FRACTIONS["train"] else "dev" if draw < 1 - SPLIT_FRACTIONS["test"] else "test"
            )
        banned = set() if split == "test" else held
        pairs, used = [], set()
        for caption in _captions(objects, rng, relations_per_image):
            negative = _negative(objects, caption, rng, banned, used)
            used.add(negative)
            # a caption without a negative stays (three circles leave no false colour for the last one's caption)
            pairs.append((_text(caption), None if negative is None else _text(negative)))
        items.append(
            SynthItem(
                image_id=f"synth_{index:06d}",
                png=_draw(objects, image_size),
                captions=[p[0] for p in pairs],
                negatives=[p[1] for p in pairs],
                split=split,
                objects=objects,
                statements=_statements(objects),
            )
        )
    return items


@dataclass
class SynthSummary:
    out: Path
    images: dict[str, int]  # images per split
    captions: int
    holdout: list[str]


def write_synth(
    out: str | Path,
    n_images: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    holdout: list[str] | None = None,
    relations_per_image: int = 2,
) -> SynthSummary:
    """Generate the set into `out`: `images/*.png` and `manifest.jsonl`, one line per image with `image_id`,
    `image` (relative path), `captions`, `negatives` (aligned with `captions`; null where a caption has none),
    `statements` (every caption of the grammar true of the image, relations included: training uses them to keep
    true pairs out of its in-batch negatives) and `split`.

    The manifest is a JSONL table every mmcross command reads (`--format table`, or auto-detected).
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds a {MANIFEST}; choose an empty folder")
    holdout = [" ".join(parse_holdout(combo)) for combo in holdout or []]  # "Red  Circle" -> "red circle", as captions
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = generate(
        n_images, seed=seed, image_size=image_size, holdout=holdout, relations_per_image=relations_per_image
    )
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as manifest:
        for item in items:
            relative = f"images/{item.image_id}.png"
            (out / relative).write_bytes(item.png)
            row = {
                "image_id": item.image_id,
                "image": relative,
                "captions": item.captions,
                "negatives": item.negatives,
                "statements": item.statements,
                "split": item.split,
            }
            manifest.write(json.dumps(row) + "\n")
    tmp.replace(out / MANIFEST)
    params = {"n_images": n_images, "seed": seed, "image_size": image_size, "holdout": holdout}
    (out / SYNTH_PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    counts = {split: sum(item.split == split for item in items) for split in ("train", "dev", "test")}
    return SynthSummary(out, counts, sum(len(item.captions) for item in items), holdout)


def read_statements(manifest: str | Path) -> dict[str, list[str]]:
    """image_id -> every caption true of the image (the manifest's `statements`; {} for a manifest without them)."""
    return {str(row["image_id"]): list(row["statements"]) for row in _manifest_rows(manifest) if row.get("statements")}


def _manifest_rows(manifest: str | Path) -> Iterator[dict]:
    """The JSON objects of a JSONL manifest (a file, or a folder holding `manifest.jsonl`), with a clear error for
    anything else: negatives and statements live only in such manifests."""
    path = Path(manifest)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} with hard negatives at {path} (make one with `mmcross data synth`)")
    if path.suffix.lower() != ".jsonl":
        raise ValueError(
            f"{path.name} is not a JSONL manifest: hard negatives are read from one with `negatives` lists"
        )
    with path.open(encoding="utf-8") as rows:
        for number, line in enumerate(rows, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path.name}: line {number} is not JSON") from None
            if isinstance(row, dict) and "image_id" in row and "captions" in row:
                yield row


def read_negatives(manifest: str | Path) -> dict[str, dict[str, str]]:
    """image_id -> {caption: its hard negative}, from a synth manifest (or any JSONL table with `negatives`)."""
    negatives: dict[str, dict[str, str]] = {}
    for row in _manifest_rows(manifest):
        pairs = {c: n for c, n in zip(row["captions"], row.get("negatives") or []) if n}  # null: none exists
        if pairs:
            negatives[str(row["image_id"])] = pairs
    return negatives


def negative_kind(caption: str, negative: str) -> str:
    """What a synth negative changed: "colour" (one object, another colour), "attributes" (the two objects' colours
    swapped, relation kept) or "arguments" (the relation's two objects swapped); "other" for text not in the grammar.

    Swapping the colours of two objects of one shape ("a red circle left of a blue circle") gives the arguments swap,
    decided by where the objects are, not by which colour goes with which shape: it counts as "arguments".
    """
    a, b = caption.split(), negative.split()
    if len(a) == len(b) == 3:
        return "colour"
    if len(a) != len(b) or len(a) < 7:
        return "other"
    # "a C1 S1 REL a C2 S2": the shapes stay in place when only the colours moved
    return "attributes" if (a[2], a[-1]) == (b[2], b[-1]) and a[2] != a[-1] else "arguments"


def read_holdout(dataset: str | Path) -> list[str]:
    """The held-out combinations a synth folder was generated with ([] when it has no synth.json)."""
    params = Path(dataset) / SYNTH_PARAMS
    held = json.loads(params.read_text()).get("holdout", []) if params.is_file() else []
    return [" ".join(combo.lower().split()) for combo in held]  # as captions spell them (older sets kept the raw text)
