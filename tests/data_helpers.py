"""Generated dataset fixtures for the tests/test_data_*.py files: tiny images in every layout mmcross reads."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def image_bytes(color=RED, size=(8, 6), fmt="JPEG", mode="RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt, **save)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def make_flickr(root: Path, crlf: bool = False) -> Path:
    """Flickr8k layout: token file, split lists, images/; one caption line names a missing image."""
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for name, color in zip(names, (RED, GREEN, BLUE, RED)):
        write(root / "images" / name, image_bytes(color))
    lines = []
    for name in names:
        lines += [f"{name}#{i}\t  caption {i} of {name}  " for i in range(2)]
    lines += ["gone.jpg#0\ta caption for a missing image"]
    end = "\r\n" if crlf else "\n"
    write(root / "Flickr8k.token.txt", end.join(lines) + end)
    write(root / "Flickr_8k.trainImages.txt", "a.jpg\nb.jpg\n")
    write(root / "Flickr_8k.devImages.txt", "c.jpg\n")
    write(root / "Flickr_8k.testImages.txt", "d.jpg\n")
    return root


def make_karpathy(root: Path) -> Path:
    images = []
    for i, (name, split) in enumerate([("a.jpg", "train"), ("b.jpg", "restval"), ("c.jpg", "val"), ("d.jpg", "test")]):
        write(root / "images" / name, image_bytes())
        images.append(
            {"filename": name, "imgid": i, "split": split, "sentences": [{"raw": f" cap {i} ", "tokens": []}]}
        )
    write(root / "dataset_flickr8k.json", json.dumps({"images": images, "dataset": "flickr8k"}))
    return root


def make_coco(root: Path) -> Path:
    """COCO layout: annotations/captions_{train,val}2014.json and train2014/, val2014/ beside annotations/."""
    for subset, ids in (("train2014", [1, 2]), ("val2014", [3])):
        images = [{"id": i, "file_name": f"COCO_{subset}_{i:012d}.jpg"} for i in ids]
        annotations = [
            {"id": 10 * i + k, "image_id": i, "caption": f"coco caption {k} of {i}"} for i in ids for k in (0, 1)
        ]
        for item in images:
            write(root / subset / item["file_name"], image_bytes())
        write(
            root / "annotations" / f"captions_{subset}.json", json.dumps({"images": images, "annotations": annotations})
        )
    return root


def make_folder(root: Path) -> Path:
    write(root / "train" / "one.jpg", image_bytes())
    write(root / "train" / "one.txt", "first caption\nsecond caption\n")
    write(root / "test" / "two.png", image_bytes(fmt="PNG"))
    write(root / "test" / "two.txt", "only caption")
    write(root / "loose.webp", image_bytes(fmt="WEBP"))  # no sidecar, no split
    return root
