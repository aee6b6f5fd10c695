"""Flickr token files (Flickr8k, Flickr30k): lines `IMAGE.jpg#N<TAB>caption`."""

from __future__ import annotations

from pathlib import Path


def read_token_file(path: str | Path) -> dict[str, list[str]]:
    """Captions per image file name, in file order; blank lines skipped, invalid UTF-8 replaced, CRLF accepted."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace", newline=None) as lines:
        for line in lines:
            key, sep, caption = line.rstrip("\n").partition("\t")
            if not sep:
                continue
            image = key.rsplit("#", 1)[0]
            captions.setdefault(image, []).append(caption.strip())
    return captions
