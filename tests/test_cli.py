"""The CLI shell through Typer's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_help_lists_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output and "embed" in result.output


def test_models_lists_presets_with_encoder_size_and_params():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["tiny"]["encoder"] == "mmcross-tiny" and rows["tiny"]["embed_dim"] == 128
    assert rows["vit-b-32"]["encoder"] == "ViT-B-32" and rows["vit-b-32"]["embed_dim"] == 512
    assert 100e6 < rows["vit-b-32"]["params"] and rows["tiny"]["params"] < rows["vit-b-32"]["params"]
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "tiny" in table.output and "vit-b-32" in table.output


def test_embed_text_and_image_to_npy(tmp_path, tiny_encoders):
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (200, 20, 20)).save(image)
    out = tmp_path / "v.npy"
    args = [
        "embed",
        "--model",
        "tiny",
        "--image",
        str(image),
        "--text",
        "a red square",
        "--text",
        "a dog",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    vectors = np.load(out)
    assert vectors.shape == (3, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    with torch.inference_mode():
        expected = tiny_encoders.text(tiny_encoders.text.tokenize(["a red square"])).pooled[0].numpy()
    assert np.allclose(vectors[1], expected / np.linalg.norm(expected), atol=1e-5)


def test_embed_set_option_changes_the_model(tmp_path):
    lines = [
        runner.invoke(app, ["embed", "--model", "tiny", "-t", "a dog", *extra]).output
        for extra in ([], ["--set", "encoder.seed=1"])
    ]
    first, second = (json.loads(line)["embedding"] for line in lines)
    assert first != second


def test_embed_checkpoint_gives_its_own_weights(tmp_path):
    """embed --checkpoint encodes with the checkpoint's towers (not a fresh preset's), and refuses another --model."""
    from mmcross.factory import create_matcher, save_checkpoint

    trained = create_matcher("tiny", overrides={"encoder.seed": 7})  # stands in for trained weights
    path = save_checkpoint(trained, tmp_path / "run" / "last.safetensors")
    result = runner.invoke(app, ["embed", "--checkpoint", str(path.parent), "-t", "a dog"])
    assert result.exit_code == 0, result.output
    with torch.inference_mode():
        expected = trained.text_encoder(trained.text_encoder.tokenize(["a dog"])).pooled[0].numpy()
    vector = np.array(json.loads(result.output)["embedding"])
    assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    fresh = json.loads(runner.invoke(app, ["embed", "--model", "tiny", "-t", "a dog"]).output)["embedding"]
    assert not np.allclose(vector, fresh, atol=1e-3)
    other = runner.invoke(app, ["embed", "--checkpoint", str(path), "--model", "vit-b-32", "-t", "a dog"])
    assert other.exit_code == 2 and "drop --model" in other.output


def test_a_command_with_no_model_named_says_its_default_is_random_init():
    """No --model, --pretrained or --checkpoint: the default ViT-B-32 has random weights, and the user is told so
    (its vectors came back with no word of it); a model the user names is taken as meant."""
    result = runner.invoke(app, ["embed", "-t", "a dog"])
    assert result.exit_code == 0, result.output
    assert "vit-b-32 with random-init weights" in result.stderr and "--checkpoint RUN_DIR" in result.stderr
    assert len(json.loads(result.stdout)["embedding"]) == 512
    named = runner.invoke(app, ["embed", "--model", "tiny", "-t", "a dog"])
    assert named.exit_code == 0 and "random-init" not in named.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "  "], "empty caption"),
        (["--image", "missing.jpg"], "cannot read image"),
        (["--set", "fusion.nope=1", "-t", "x"], "unknown config key"),
        (["--pretrained", "no-such-tag", "-t", "x"], "neither a file nor an open_clip tag"),
        ([], "at least one --text or --image"),
    ],
)
def test_embed_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, ["embed", "--model", "tiny", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_embed_refuses_what_it_cannot_embed_before_loading_a_model(monkeypatch):
    """An empty caption or a missing image is refused before the model loads (a first int8 run converts for seconds)."""
    import mmcross.factory

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mmcross.factory, "load_matcher", no_load)
    for args, message in (
        (["-t", "a dog", "-t", " "], "empty caption at position(s) [1]"),
        (["-i", "gone.jpg"], "gone.jpg"),
    ):
        result = runner.invoke(app, ["embed", "-m", "tiny", "--precision", "int8", *args])
        assert result.exit_code == 2 and message in result.output, result.output
