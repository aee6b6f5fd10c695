"""Safe image loading against an adversarial corpus: each file ends as a correct RGB image or a clear reject."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_helpers import BLUE, GREEN, RED, image_bytes, png_claiming, write
from PIL import Image

from mmcross.data.images import ImageError, decode, load_rgb, shard_payload, try_decode
from mmcross.data.records import Reject


def _exif_rotated_jpeg() -> bytes:
    """40x20 stored (left half red, right half blue) with EXIF orientation 6: shown rotated 90 degrees clockwise."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (10, 10), color) for color in (RED, BLUE, GREEN)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def _png_alpha() -> bytes:
    """Left half opaque red, right half fully transparent (its colour underneath is green)."""
    image = Image.new("RGBA", (10, 10), (*GREEN, 0))
    image.paste((*RED, 255), (0, 0, 5, 10))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _palette_gif_with_transparency() -> bytes:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (5, 0, 10, 10))  # right half palette index 1 (blue), declared transparent
    out = io.BytesIO()
    image.save(out, format="GIF", transparency=1)
    return out.getvalue()


def _png_16bit(value: int) -> bytes:
    image = Image.fromarray(np.full((6, 8), value, dtype=np.uint16))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _la_png() -> bytes:
    image = Image.new("LA", (6, 6), (0, 0))  # black, fully transparent
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    jpeg = image_bytes(RED, (32, 24), quality=95)
    files = {
        "truncated.jpg": image_bytes(RED, (64, 64), quality=95)[:300],
        "zero.jpg": b"",
        "text.jpg": "this is not an image, it is text\n",
        "alpha.png": _png_alpha(),
        "palette.gif": _palette_gif_with_transparency(),
        "animated.gif": _animated_gif(),
        "sixteen.png": _png_16bit(65535),
        "sixteen_half.png": _png_16bit(32896),
        "sixteen_dark.png": _png_16bit(200),  # 16-bit values that happen to fit 8 bits: still 16-bit, so near black
        "cmyk.jpg": image_bytes((0, 255, 255, 0), (8, 8), mode="CMYK", quality=95),  # cyan 0, magenta+yellow: red
        "rotated.jpg": _exif_rotated_jpeg(),
        "bomb.png": png_claiming(30000, 30000),
        "image.webp": image_bytes(GREEN, (8, 8), fmt="WEBP", lossless=True),
        "dir with spaces/ünïcødé 写真 ñame.jpg": jpeg,
        "gray.jpg": image_bytes(128, (8, 8), mode="L", quality=95),
        "la.png": _la_png(),
        "bilevel.png": image_bytes(1, (8, 8), fmt="PNG", mode="1"),
        "plain.bmp": image_bytes(BLUE, (8, 8), fmt="BMP"),
        "plain.tiff": image_bytes(BLUE, (8, 8), fmt="TIFF"),
        "corrupt.png": image_bytes(RED, (16, 16), fmt="PNG")[:40] + b"\x00garbage" * 10,
    }
    for name, data in files.items():
        write(root / name, data)
    (root / "a directory.jpg").mkdir()
    return root


def _rgb(corpus, name, **options) -> np.ndarray:
    decoded = decode(corpus / name, **options)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image).astype(int)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated.jpg", "truncated"),
        ("zero.jpg", "empty file (0 bytes)"),
        ("text.jpg", "not an image"),
        ("bomb.png", "too many pixels"),
        ("missing.jpg", "missing file"),
        ("a directory.jpg", "not a file"),
        ("corrupt.png", ""),
    ],
)
def test_bad_files_become_rejects_with_a_reason(corpus, name, reason):
    result = try_decode(corpus / name, str(corpus / name), image_id=name)
    assert isinstance(result, Reject)
    assert reason in result.reason and result.reason
    assert result.path == str(corpus / name) and result.image_id == name
    with pytest.raises(ImageError):
        decode(corpus / name)
    with pytest.raises(ValueError, match="cannot read image"):
        load_rgb(corpus / name)


def test_bomb_header_names_its_size(corpus):
    reason = try_decode(corpus / "bomb.png", "bomb.png").reason
    assert "900,000,000" in reason and "89,478,485" in reason


def test_pixel_limit_is_configurable(corpus):
    assert isinstance(try_decode(corpus / "rotated.jpg", "r", max_pixels=799), Reject)  # 40 x 20 = 800 pixels
    assert not isinstance(try_decode(corpus / "rotated.jpg", "r", max_pixels=800), Reject)


def test_exif_orientation_is_applied(corpus):
    pixels = _rgb(corpus, "rotated.jpg")
    assert pixels.shape == (40, 20, 3)  # stored 40 wide x 20 high, shown 20 wide x 40 high
    assert np.abs(pixels[5, 10] - RED).max() < 40  # the stored left half is now on top
    assert np.abs(pixels[35, 10] - BLUE).max() < 40
    assert decode(corpus / "rotated.jpg").rotated


def test_alpha_is_composited_on_the_background(corpus):
    white = _rgb(corpus, "alpha.png")
    assert tuple(white[5, 2]) == RED and tuple(white[5, 8]) == (255, 255, 255)
    black = _rgb(corpus, "alpha.png", background=(0, 0, 0))
    assert tuple(black[5, 2]) == RED and tuple(black[5, 8]) == (0, 0, 0)
    assert tuple(_rgb(corpus, "la.png")[0, 0]) == (255, 255, 255)


def test_palette_transparency_and_animation(corpus):
    palette = _rgb(corpus, "palette.gif")
    assert tuple(palette[5, 2]) == RED and tuple(palette[5, 8]) == (255, 255, 255)
    animated = decode(corpus / "animated.gif")
    assert animated.n_frames == 3
    assert np.abs(np.asarray(animated.image).astype(int)[5, 5] - RED).max() < 10  # the first frame


def test_sixteen_bit_is_scaled_not_clipped(corpus):
    assert decode(corpus / "sixteen.png").mode.startswith("I")
    assert tuple(_rgb(corpus, "sixteen.png")[0, 0]) == (255, 255, 255)
    assert tuple(_rgb(corpus, "sixteen_half.png")[0, 0]) == (128, 128, 128)  # 32896 / 257
    assert tuple(_rgb(corpus, "sixteen_dark.png")[0, 0]) == (1, 1, 1)  # 200 / 257, not 200


def test_other_modes_and_formats(corpus):
    assert decode(corpus / "cmyk.jpg").mode == "CMYK"
    cmyk = _rgb(corpus, "cmyk.jpg")[4, 4]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # magenta + yellow ink = red
    assert tuple(_rgb(corpus, "image.webp")[0, 0]) == GREEN
    assert abs(int(_rgb(corpus, "gray.jpg")[0, 0, 0]) - 128) < 3
    assert tuple(_rgb(corpus, "bilevel.png")[0, 0]) == (255, 255, 255)
    assert tuple(_rgb(corpus, "plain.bmp")[0, 0]) == BLUE and tuple(_rgb(corpus, "plain.tiff")[0, 0]) == BLUE
    assert _rgb(corpus, "dir with spaces/ünïcødé 写真 ñame.jpg").shape == (24, 32, 3)


def test_bytes_sources_and_no_exception_escapes(corpus):
    for path in sorted(corpus.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        for source in (path, data):
            result = try_decode(source, str(path))
            assert isinstance(result, Reject) or result.image.mode == "RGB"


def test_draft_decoding_keeps_at_least_the_requested_size():
    big = image_bytes(RED, (800, 600), quality=90)
    decoded = decode(big, draft_size=(224, 224))
    assert decoded.image.size[0] >= 224 and decoded.image.size[1] >= 224 and decoded.image.size[0] < 800


def test_shard_payload_keeps_plain_files_and_normalises_the_rest(corpus):
    plain = (corpus / "dir with spaces/ünïcødé 写真 ñame.jpg").read_bytes()
    assert shard_payload(decode(plain), plain) == ("jpg", plain)
    for name, ext in [("rotated.jpg", "jpg"), ("cmyk.jpg", "jpg"), ("alpha.png", "png"), ("animated.gif", "png")]:
        original = (corpus / name).read_bytes()
        decoded = decode(original)
        got_ext, payload = shard_payload(decoded, original)
        assert got_ext == ext and payload != original
        with Image.open(io.BytesIO(payload)) as again:  # what any plain reader (open_clip's pilrgb) sees
            assert again.mode == "RGB" and again.size == decoded.image.size
