"""What a new user mistypes or hands over: one clear line each, nothing written, nothing silently ignored (a review's
findings: run configs, model files, weights files, encoder precision, notes a run must show without --verbose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from mmcross.config import MatcherCfg, apply_overrides, load_matcher_cfg, load_run_cfg
from mmcross.factory import create_matcher, save_checkpoint
from tests.train_helpers import make_shapes

runner = CliRunner()
TINY = Path(__file__).resolve().parents[1] / "mmcross" / "model_configs" / "tiny.json"


def _refused(args: list[str], *messages: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for message in messages:
        assert message in result.output, result.output
    return result.output


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=16, n_dev=4)


def test_config_values_are_checked_wherever_they_come_from(tmp_path):
    with pytest.raises(ValueError, match=r"fusion\.dim: cannot read 64\.5"):
        apply_overrides(MatcherCfg(), {"fusion.dim": 64.5})  # a run config's `matcher:` value
    with pytest.raises(ValueError, match=r"itc_weight: cannot read \[1, 2\]"):
        apply_overrides(MatcherCfg(), {"itc_weight": [1, 2]})
    assert apply_overrides(MatcherCfg(), {"itc_weight": 4}).itc_weight == 4.0
    with pytest.raises(ValueError, match=r"^fusion\.dim: cannot read 'abc'"):
        apply_overrides(MatcherCfg(), {"fusion.dim": "abc"})  # a --set value names its key too
    for value in ("nan", "inf", float("nan"), float("-inf")):  # a NaN weight ranked every candidate first
        with pytest.raises(ValueError, match="itc_weight: .*is not a finite number"):
            apply_overrides(MatcherCfg(), {"itc_weight": value})
    nan = tmp_path / "nan.yaml"
    nan.write_text(f"model: tiny\nmatcher:\n  itc_weight: .nan\ntrain:\n  data: {tmp_path}\n")
    _refused(["train", "--config", str(nan), "--out", str(tmp_path / "nan")], "itc_weight: nan is not a finite")
    assert not (tmp_path / "nan").exists()
    _refused(["embed", "-t", "a dog", "-m", "tiny", "--set", "itc_weight=nan"], "itc_weight: 'nan' is not a finite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nbogus: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_run_cfg(bad)
    (tmp_path / "yaml.json").write_text("model: tiny\n")
    with pytest.raises(ValueError, match=r"model config .*yaml\.json is not JSON"):
        load_matcher_cfg(str(tmp_path / "yaml.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_matcher_cfg(str(tmp_path / "list.json"))


def test_a_run_whose_model_cannot_be_built_writes_nothing(shapes, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\nmatcher:\n  fusion.dim: 64.5\ntrain:\n  data: {shapes}\n  max_steps: 2\n")
    _refused(["train", "--config", str(config), "--out", str(tmp_path / "run")], "fusion.dim: cannot read 64.5")
    assert not (tmp_path / "run").exists()


def test_weights_files_that_do_not_fit_are_one_line(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from mmcross.encoders import _register_configs

    _register_configs()
    other = open_clip.create_model("mmcross-rn-small").state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "rn.safetensors")
    _refused(["embed", "-m", "tiny", "--pretrained", str(tmp_path / "rn.safetensors"), "-t", "a"], "does not hold")
    data = (tmp_path / "rn.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _refused(
        ["embed", "-m", "rn-small", "--pretrained", str(tmp_path / "cut.safetensors"), "-t", "a"], "not a readable"
    )
    ckpt = save_checkpoint(create_matcher("tiny"), tmp_path / "run" / "last.safetensors")
    data = ckpt.read_bytes()
    (tmp_path / "cut-ckpt.safetensors").write_bytes(data[: len(data) // 2])
    _refused(["embed", "--checkpoint", str(tmp_path / "cut-ckpt.safetensors"), "-t", "a"], "damaged or truncated")


def test_a_model_file_beside_a_checkpoint_cannot_change_its_ranking_in_silence(tmp_path):
    ckpt = save_checkpoint(create_matcher("tiny"), tmp_path / "run" / "last.safetensors")
    config = json.loads(TINY.read_text())
    (tmp_path / "my4.json").write_text(json.dumps({**config, "itc_weight": 4.0}))
    base = ["embed", "--checkpoint", str(ckpt), "--model", str(tmp_path / "my4.json"), "-t", "a"]
    _refused(base, "ranks by itm + 4 x itc", "by itm + 1 x itc")
    _ok([*base, "--set", "itc_weight=4"])
    _ok(["embed", "--checkpoint", str(ckpt), "--model", "tiny", "-t", "a"])


def test_encoder_precision_is_checked_and_half_towers_take_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 20, 20)).save(tmp_path / "a.png")
    _refused(["embed", "-m", "tiny", "--set", "encoder.precision=foo", "-t", "a"], "encoder.precision 'foo'")
    for precision in ("bf16", "fp16"):
        out = _ok(
            ["embed", "-m", "tiny", "--set", f"encoder.precision={precision}", "--image", str(tmp_path / "a.png")]
        )
        assert len(json.loads(out)["embedding"]) == 128


def test_a_run_says_what_it_falls_back_to_and_a_stop_before_any_loss_line_is_no_error(shapes, tmp_path, monkeypatch):
    import mmcross.train.loop as loop

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    args = ["train", "--out", str(tmp_path / "run"), "--set", "model=tiny", "--set", f"train.data={shapes}"]
    args += ["--set", "train.eval_split=none", "--set", "train.batch_size=8", "--set", "train.log_every=25"]
    args += ["--set", "train.autocast=bf16", "--set", "train.max_steps=3", "--set", "train.max_minutes=0.0001"]
    out = _ok(args)  # without --verbose
    assert "this CPU has no native bf16 (AVX512-BF16 or AMX), so the run stays fp32" in out
    assert "stopping at step 1: train.max_minutes=0.0001 reached" in out
    assert not (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "last.safetensors").is_file()


def test_a_run_resumes_after_its_model_file_moved(shapes, tmp_path):
    model = tmp_path / "mine.json"
    model.write_text(TINY.read_text())
    args = ["train", "--out", str(tmp_path / "run"), "--set", f"model={model}", "--set", f"train.data={shapes}"]
    args += ["--set", "train.eval_split=none", "--set", "train.batch_size=8", "--set", "train.max_steps=2"]
    _ok([*args, "--set", "train.max_minutes=0.0001"])
    model.rename(tmp_path / "moved.json")  # the checkpoint holds the architecture the run goes on with
    _ok(["train", "--out", str(tmp_path / "run"), "--resume", "--set", "train.max_minutes=60"])
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["stopped_by"] == "max_steps" and last["max_steps"] == 2


def test_a_torn_last_log_line_does_not_block_resume(tmp_path):
    from mmcross.train.state import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_train_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "log.jsonl").write_text("")
    _refused(["train", "--out", str(tmp_path / "log.jsonl"), "--set", "model=tiny"], "log.jsonl is a file")


def test_a_run_folder_given_to_pretrained_points_to_checkpoint(tmp_path):
    save_checkpoint(create_matcher("tiny"), tmp_path / "run" / "last.safetensors")
    _refused(["embed", "-m", "tiny", "--pretrained", str(tmp_path / "run"), "-t", "a"], "goes to --checkpoint")
    args = ["embed", "--checkpoint", str(tmp_path / "run"), "-m", "tiny", "--set", "fusion.dim=64", "-t", "a"]
    _refused(args, "--model tiny with --set is")


def test_a_dev_image_the_run_cannot_read_is_in_its_rejects(tmp_path):
    """The run's dev evaluation counted unreadable dev images in its log line only; now rejects.jsonl names them."""
    manifest = make_shapes(tmp_path / "shapes", n_train=16, n_dev=4)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    dev = next(row for row in rows if row["split"] == "dev")
    (manifest.parent / dev["image"]).write_bytes(b"not a png")
    args = ["train", "--out", str(tmp_path / "run"), "--set", "model=tiny", "--set", f"train.data={manifest}"]
    args += ["--set", "train.eval_split=dev", "--set", "train.batch_size=8", "--set", "train.max_steps=2"]
    summary = json.loads(_ok([*args, "--quiet"]))
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rejects] == [Path(dev["image"]).name]
    assert summary["rejects"] == 1


def test_eval_device_is_checked_in_one_line(tmp_path, monkeypatch):
    """--device tpu was "cannot build open_clip model ...", --device cuda without CUDA "Found no NVIDIA driver"."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(
        ["eval", str(tmp_path), "-m", "tiny", "--device", "tpu"], "--device is auto, cpu, cuda or cuda:N, not 'tpu'"
    )
    _refused(["eval", str(tmp_path), "-m", "tiny", "--device", "cuda"], "--device=cuda, but this machine has no CUDA")


def test_under_torchrun_only_rank_0_prints_the_summary(shapes, tmp_path, monkeypatch):
    """`torchrun ... train > summary.json` is one JSON object: the other ranks print none (rank 1 printed one)."""
    args = ["train", "--out", str(tmp_path / "run"), "--set", "model=tiny", "--set", f"train.data={shapes}"]
    args += ["--set", "train.eval_split=none", "--set", "train.batch_size=8", "--set", "train.max_steps=1", "--quiet"]
    monkeypatch.setenv("RANK", "1")  # rank 1's view once its steps are done (no process group: WORLD_SIZE unset)
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and result.stdout == "", result.output
