"""Attention heat maps and `mmcross explain` on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mmcross.encoders import token_strings
from mmcross.factory import create_matcher
from mmcross.report.heatmap import combine_attention, explain, heatmap_size, patch_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_matcher(tiny_encoders):
    return create_matcher("tiny")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "shapes.png"
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[10:40, 10:40] = (220, 30, 30)
    pixels[20:50, 55:85] = (30, 30, 220)
    Image.fromarray(pixels).save(path)
    return path


def test_combine_attention_is_head_mean_of_last_layer_or_all_layers():
    first, last = torch.rand(1, 4, 3, 16), torch.rand(1, 4, 3, 16)
    assert torch.allclose(combine_attention([first, last]), last.mean(dim=1))
    assert torch.allclose(combine_attention([first, last], layer=None), (first.mean(1) + last.mean(1)) / 2)
    assert patch_grid(64) == 8
    with pytest.raises(ValueError):
        patch_grid(50)


def test_token_strings_decode_word_pieces(tiny_matcher):
    ids = tiny_matcher.tokenize("a red circle")[0, :5].tolist()
    assert token_strings(tiny_matcher.text_encoder.tokenizer, ids) == [
        "<start_of_text>",
        "a",
        "red",
        "circle",
        "<end_of_text>",
    ]


def test_heatmap_is_a_png_of_the_expected_size(tiny_matcher, image_file, tmp_path):
    out = tmp_path / "heat.png"
    result = explain(tiny_matcher, image_file, "a red square left of a blue square", out, panel=64)
    assert [w.word for w in result.words] == ["a", "red", "square", "left", "of", "a", "blue", "square"]
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == heatmap_size(8, 64) == result.size == (6 * 64, 40 + 2 * (64 + 18))
    assert 0 < result.itm < 1 and -1 <= result.itc <= 1
    assert result.score == pytest.approx(result.itm + tiny_matcher.cfg.itc_weight * result.itc, abs=1e-5)
    assert all(0 < w.share <= 1 + 1e-5 and w.weights.shape == (64,) for w in result.words)


def test_explain_cli_prints_scores_and_writes_png(tiny_matcher, image_file, tmp_path):
    out = tmp_path / "cli-heat.png"
    args = ["explain", str(image_file), "a blue square", "--model", "tiny", "--out", str(out), "--panel", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "itc " in result.output and "itm " in result.output and "score " in result.output
    with Image.open(out) as png:
        assert png.size == heatmap_size(3, 48)
    missing = CliRunner().invoke(app, ["explain", str(tmp_path / "nope.jpg"), "x", "-m", "tiny", "-o", str(out)])
    assert missing.exit_code == 2 and "no image" in missing.output
