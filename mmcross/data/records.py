"""The record every reader yields, reject records, and the text helpers readers share.

A `Record` is one image with its captions: an id, the image as a file path (or encoded bytes, for webdataset
shards), the captions, and the split. Problems found while reading (empty captions, invalid UTF-8, unparsable lines)
are collected in a `ReadStats` rather than raised, so one bad line never stops a job; a job writes its rejects with a
`RejectLog` to `rejects.jsonl` in its output folder.
"""

from __future__ import annotations

import html
import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}
UNASSIGNED = "unassigned"  # how reports name records that no split lists
ALL = "all"  # the `--split` (and `train.split`) that reads every record, those without a split included
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# folders that hold a dataset's images, by the names Flickr8k, Flickr30k and their mirrors use
IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")


class NothingReadable(ValueError):
    """A job found no usable record or image at all (every one missing, unreadable or rejected): exit status 1."""

    def __init__(self, message: str, rejects: list[Reject] | None = None):
        super().__init__(message)
        self.rejects = rejects or []  # why each image was unusable, for the job's rejects.jsonl


@dataclass
class Record:
    """One image and its captions, as every reader yields it."""

    image_id: str  # unique within a dataset: a file name, a relative path, a COCO id or a shard key
    captions: list[str]  # stripped, non-empty; may be empty for an image without captions
    split: str | None = None  # train, dev or test; None when the dataset does not say
    path: Path | None = None  # the image file (None when the image comes as bytes)
    data: bytes | None = None  # the encoded image, for records read from webdataset shards
    origin: str = ""  # where the record was read, for messages: "Flickr8k.token.txt", "shard-000000.tar"
    lines: list[int] = field(default_factory=list)  # 1-based source lines (or rows) the record came from

    @property
    def where(self) -> str:
        """The image's location for messages and reject records: its path, or `origin#image_id` for bytes."""
        if self.path is not None:
            return str(self.path)
        return f"{self.origin}#{self.image_id}" if self.origin else self.image_id


@dataclass
class Reject:
    """Something that could not be used, and why; written one per line to `rejects.jsonl`."""

    path: str  # the image file, `shard.tar#key`, or the text file holding a bad caption
    reason: str  # one line: "missing file", "truncated image: ...", "empty caption"
    image_id: str | None = None
    kind: str = "image"  # image, caption or record
    line: int | None = None  # 1-based line or row in `path`, for caption rejects

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


@dataclass
class ReadStats:
    """What a reader noticed besides the records themselves."""

    rejects: list[Reject] = field(default_factory=list)  # empty captions, unparsable lines or rows
    invalid_utf8: int = 0  # captions (or lines) whose invalid UTF-8 bytes were replaced by U+FFFD
    notes: list[str] = field(default_factory=list)  # where splits and images were found, for the report
    orphans: list[str] = field(default_factory=list)  # image files that no caption line names

    def reject(
        self,
        path: str | Path,
        reason: str,
        *,
        image_id: str | None = None,
        kind: str = "caption",
        line: int | None = None,
    ) -> None:
        self.rejects.append(Reject(str(path), reason, image_id=image_id, kind=kind, line=line))


def normalise_split(name: object, strict: bool = True) -> str | None:
    """train / dev / test from any common spelling (val, validation -> dev); None for None, empty or `all`.

    Unknown names raise ValueError when `strict` (a user's `--split`), else give None (a dataset's own labels).
    """
    if name is None or not str(name).strip() or str(name).strip().lower() == ALL:
        return None
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        if strict:
            raise ValueError(f"unknown split {name!r}; use train, dev (alias val), test, or all (every record)")
        return None
    return SPLIT_ALIASES[key]


def decode_text(raw: bytes, stats: ReadStats) -> str:
    """UTF-8 (a leading BOM dropped), invalid bytes replaced by U+FFFD and counted in `stats.invalid_utf8`."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def read_lines(path: str | Path, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a text file; LF, CRLF and CR endings all accepted, invalid UTF-8 replaced."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"), start=1):
        yield number, decode_text(raw, stats)


def blank_caption(text: object) -> bool:
    """True when no word is left for a tokenizer: whitespace, format characters (a BOM, zero-width spaces) and HTML
    entities of them (open_clip's tokenizer unescapes HTML, so "&nbsp;" is a space to it and tokenizes to nothing)."""
    unescaped = html.unescape(html.unescape(str(text)))  # twice, as open_clip's basic_clean
    return not "".join(ch for ch in unescaped if unicodedata.category(ch) != "Cf").strip()


def clean_caption(
    text: object, stats: ReadStats, where: str | Path, *, image_id: str | None = None, line: int | None = None
) -> str | None:
    """A caption stripped of surrounding whitespace, or None (and a reject) when nothing is left."""
    caption = "" if text is None else str(text).strip()
    if blank_caption(caption):
        stats.reject(where, "empty caption", image_id=image_id, line=line)
        return None
    return caption


def caption_key(caption: str) -> str:
    """What makes two captions the same text: case, runs of spaces and a final period do not count."""
    return " ".join(caption.lower().split()).rstrip(" .")


def find_first(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` that exists as a sub-folder of `folder`."""
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return None


class RejectLog:
    """Appends reject records to `rejects.jsonl` in a job's output folder and counts them.

    With `keep` (a resumed job) the records already there stay and count, and one written again is not repeated:
    the resumed job meets again only what comes after its checkpoint, so emptying the file would lose the rest.
    """

    def __init__(self, out_dir: str | Path, name: str = "rejects.jsonl", keep: bool = False):
        self.path = Path(out_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self.path.read_text(encoding="utf-8").splitlines() if keep and self.path.is_file() else []
        self.seen = {line for line in kept if line.strip()}
        self.path.write_text("".join(line + "\n" for line in kept if line.strip()), encoding="utf-8")
        self.count = len(self.seen)

    def write(self, rejects: Iterable[Reject | tuple[int, Reject]]) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            for reject in rejects:
                line = (reject[1] if isinstance(reject, tuple) else reject).to_json()
                if line in self.seen:
                    continue
                self.seen.add(line)
                out.write(line + "\n")
                self.count += 1


def read_rejects(path: str | Path) -> list[dict]:
    """The records of a `rejects.jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
