"""Safe image loading: any file in, an RGB PIL image or a one-line reason out.

What `decode` does, in order:

1. Refuses missing, empty (0 bytes) and non-image files with a reason instead of an exception.
2. Reads the header and refuses images with more than `max_pixels` pixels (a decompression-bomb guard; the default
   is PIL's own limit, 89,478,485 pixels, and a larger limit raises PIL's limit to match, never lowers it).
3. Decodes the first frame (animated GIF/WebP: the first frame), so truncated and corrupt files fail here.
4. Applies the EXIF orientation (a photo taken sideways comes out upright); a broken EXIF block is ignored.
5. Converts every mode to 8-bit RGB: palette and grayscale expand; CMYK converts; 16-bit and 32-bit grayscale are
   scaled to 0..255 (not clipped); images with alpha (RGBA, LA, PA, palette or grayscale with a transparent
   colour) are alpha-composited on `background`, white (255, 255, 255) by default.

`try_decode` wraps it for jobs: it returns a `Reject` record instead of raising, for any file at all.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmcross.data.records import Reject

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default
WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what webdataset readers (and open_clip) decode


class ImageError(ValueError):
    """An image that cannot be used; the message is the one-line reason."""


@dataclass
class Decoded:
    """An image decoded to RGB, with what the file was."""

    image: Image.Image  # RGB, EXIF orientation applied
    format: str | None  # PIL format name of the file: JPEG, PNG, GIF, WEBP, ...
    mode: str  # the file's own mode before conversion: RGB, L, P, RGBA, CMYK, I;16, ...
    size: tuple[int, int]  # (width, height) as stored, before the EXIF rotation
    rotated: bool  # whether an EXIF orientation other than 1 was applied
    n_frames: int  # frames in the file (animated GIF/WebP > 1; the first one is used)
    transparent: bool = False  # whether the file had alpha or a transparent colour (composited on the background)


def _open(source: str | Path | bytes) -> io.BufferedIOBase:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("empty file (0 bytes)")
        return io.BytesIO(source)
    path = Path(source)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ImageError("missing file") from None
    except IsADirectoryError:
        raise ImageError("not a file (a directory)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as err:
        raise ImageError(f"cannot open: {err.strerror or err}") from None
    if path.stat().st_size == 0:
        handle.close()
        raise ImageError("empty file (0 bytes)")
    return handle


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha (or a palette's transparent colour) composited on `background`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if values.size and values.max() <= 1.0 else 255.0
        elif mode.startswith("I;16"):  # 16-bit by the mode, whatever the values: a dark image stays dark
            top = 65535.0
        else:  # "I" (32-bit; older Pillow opens 16-bit PNGs so): 16-bit unless every value already fits 8 bits
            top = 65535.0 if values.size and values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    draft_size: tuple[int, int] | None = None,
) -> Decoded:
    """Decode an image file (or its bytes) safely to RGB; raises `ImageError` with a one-line reason.

    Args:
        source: a path, or the encoded bytes.
        max_pixels: width * height above which the image is refused without being decoded.
        background: RGB colour that transparent pixels are composited on.
        draft_size: (width, height) the caller will resize to; JPEGs may then decode at a reduced scale (never
            smaller than this), which is several times faster for large photos.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # let PIL open what the caller allows; ours is checked below
    handle = _open(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(_too_large(width, height, max_pixels))
                fmt, mode, frames = image.format, image.mode, getattr(image, "n_frames", 1)
                if draft_size is not None and fmt == "JPEG":
                    image.draft("RGB" if mode in ("RGB", "YCbCr") else mode, draft_size)
                image.load()
                transparent = mode in _ALPHA_MODES or "transparency" in image.info
                rotated = False
                try:
                    orientation = image.getexif().get(0x0112, 1)
                    if orientation not in (1, None):
                        image = ImageOps.exif_transpose(image)
                        rotated = True
                except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
                    pass
                return Decoded(to_rgb(image, background), fmt, mode, (width, height), rotated, frames, transparent)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses at twice its own limit, before we see the size
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else str(err)
        raise ImageError(f"too many pixels (decompression-bomb guard): {size} > {max_pixels:,}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as err:
        text = str(err) or type(err).__name__
        if "truncated" in text.lower() or isinstance(err, EOFError):
            raise ImageError(f"truncated image: {text}") from None
        raise ImageError(f"corrupt image: {text}") from None
    finally:
        handle.close()


def _too_large(width: int, height: int, limit: int) -> str:
    return f"too many pixels (decompression-bomb guard): {width}x{height} = {width * height:,} > {limit:,}"


def load_rgb(source: str | Path | bytes, **options) -> Image.Image:
    """The RGB image of a file or bytes (see `decode` for options); raises `ImageError` (a ValueError) if unusable."""
    try:
        return decode(source, **options).image
    except ImageError as err:
        raise ImageError(f"cannot read image {source if not isinstance(source, bytes) else '<bytes>'}: {err}") from None


def try_decode(source: str | Path | bytes, where: str, image_id: str | None = None, **options) -> Decoded | Reject:
    """`decode`, but any failure at all becomes a `Reject(where, reason)`: for jobs that must not stop."""
    try:
        return decode(source, **options)
    except ImageError as err:
        return Reject(where, str(err), image_id=image_id)
    except Exception as err:  # noqa: BLE001 - whatever a hostile file triggers, the job goes on
        return Reject(where, f"unreadable: {type(err).__name__}: {err}", image_id=image_id)


def shard_payload(decoded: Decoded, original: bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store in a webdataset shard: the original bytes when any reader decodes them to the same
    RGB image (JPEG, PNG or WebP; RGB or grayscale; upright; no transparency), else the RGB image re-encoded
    (JPEG quality 95 for lossy sources, PNG otherwise)."""
    ext = _KEEP_FORMATS.get(decoded.format or "")
    plain = decoded.mode in ("RGB", "L") and not decoded.transparent
    if ext and plain and not decoded.rotated and decoded.n_frames == 1:
        return ext, original
    out = io.BytesIO()
    if decoded.format in ("JPEG", "MPO", "WEBP"):
        decoded.image.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue()
    decoded.image.save(out, format="PNG")
    return "png", out.getvalue()
