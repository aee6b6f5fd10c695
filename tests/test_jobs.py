"""What every job does alike: `--split all` for data without splits, rejects recorded (nothing readable: exit 1),
and progress on stderr when it is a log file, not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from mmcross.data.records import read_rejects
from tests.train_helpers import make_shapes

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--set", "train.batch_size=4", "--set", "train.warmup_steps=1", "--set", "train.eval_split=none"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=8, n_dev=4)


@pytest.fixture(scope="module")
def no_split(shapes, tmp_path_factory) -> Path:
    """A CSV of the shapes without a split column."""
    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    table = tmp_path_factory.mktemp("nosplit") / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f"{shapes.parent / r['image']},{r['captions'][0]}\n" for r in rows))
    return table


def _damaged(shapes: Path, root: Path, missing: int, corrupt: int) -> Path:
    """A copy of the shapes manifest where `missing` images name no file and `corrupt` hold no image."""
    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["image"] = str(shapes.parent / row["image"])
        if i < missing:
            row["image"] = str(root / f"gone{i}.png")
        elif i < missing + corrupt:
            row["image"] = str(root / f"bad{i}.png")
            (root / f"bad{i}.png").write_bytes(b"\x89PNG not really")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_split_all_reads_data_without_splits(no_split, tmp_path):
    refused = runner.invoke(app, ["eval", str(no_split), "-m", "tiny", "--rerank", "0", "--quiet"])
    assert refused.exit_code == 2
    assert "no images with captions in split 'test' (it has unassigned 12); --split all reads" in refused.output
    result = runner.invoke(app, ["eval", str(no_split), "-m", "tiny", "--rerank", "0", "--split", "all", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 12
    assert "all (every record" in runner.invoke(app, ["eval", "--help"]).output

    args = ["train", "--out", str(tmp_path / "run"), "--quiet", *TRAIN, "--set", f"train.data={no_split}"]
    refused = runner.invoke(app, [*args, "--set", "train.max_steps=1"])
    assert refused.exit_code == 2 and "train.split=all reads every record" in refused.output
    done = runner.invoke(app, [*args, "--set", "train.max_steps=1", "--set", "train.split=all"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["step"] == 1
    wrong = runner.invoke(app, [*args, "--out", str(tmp_path / "r2"), "--set", "train.split=none"])
    assert wrong.exit_code == 2 and "train.split: unknown split 'none'" in wrong.output and "all (every" in wrong.output
    assert not (tmp_path / "r2").exists()  # refused before anything is written


@pytest.mark.parametrize("cache", ["auto", "none"])  # decoded-image cache, or streamed from the files
def test_train_records_its_rejects(shapes, tmp_path, cache):
    manifest = _damaged(shapes, tmp_path, missing=2, corrupt=1)
    args = ["train", "--out", str(tmp_path / "run"), "--quiet", *TRAIN, "--set", f"train.data={manifest}"]
    result = runner.invoke(app, [*args, "--set", "train.max_steps=3", "--set", f"train.decode_cache={cache}"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    rejects = read_rejects(tmp_path / "run" / "rejects.jsonl")
    assert summary["rejects"] == 3 and summary["step"] == 3
    assert sorted(Path(r["path"]).name for r in rejects) == ["bad2.png", "gone0.png", "gone1.png"]
    assert (tmp_path / "run" / "last.safetensors").is_file()  # the run itself is whole
    # resumed (here: two more steps, asked for), the rejects found before stay, each once; streamed, the resumed
    # process meets only the images after its checkpoint, and the file used to be emptied at its start
    longer = ["--set", "train.max_steps=5", "--set", f"train.decode_cache={cache}", "--resume"]
    resumed = runner.invoke(app, [*args, *longer])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["rejects"] == 3
    assert sorted(Path(r["path"]).name for r in read_rejects(tmp_path / "run" / "rejects.jsonl")) == [
        "bad2.png",
        "gone0.png",
        "gone1.png",
    ]


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_nothing_readable_is_exit_1_with_one_line(shapes, tmp_path, cache):
    manifest = _damaged(shapes, tmp_path, missing=8, corrupt=4)
    args = ["train", "--out", str(tmp_path / "run"), "--quiet", *TRAIN, "--set", f"train.data={manifest}"]
    result = runner.invoke(app, [*args, "--set", "train.max_steps=2", "--set", f"train.decode_cache={cache}"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: none of the training images of") and "Traceback" not in result.output
    assert len(read_rejects(tmp_path / "run" / "rejects.jsonl")) == 8  # the train split's images, each once

    index = runner.invoke(
        app, ["index", str(manifest), "-o", str(tmp_path / "idx"), "-m", "tiny", "-j", "0", "--quiet"]
    )
    assert index.exit_code == 1 and "error: no image of" in index.output and "12 reject(s)" in index.output
    assert len(read_rejects(tmp_path / "idx" / "rejects.jsonl")) == 12
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["rejects.jsonl"]  # the same command runs again
    again = runner.invoke(app, ["index", str(shapes), "-o", str(tmp_path / "idx"), "-m", "tiny", "-j", "0", "--quiet"])
    assert again.exit_code == 0 and not read_rejects(tmp_path / "idx" / "rejects.jsonl"), again.output


def test_train_writes_progress_lines_to_a_log_file(shapes, tmp_path):
    """`mmcross train ... 2> log`: plain lines at the set interval (30 s by default; here 0: a line every step)."""
    log = tmp_path / "train.log"
    env = {**os.environ, "MMCROSS_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "train",
        "--out",
        str(tmp_path / "run"),
        *TRAIN,
        "--set",
        f"train.data={shapes}",
    ]
    with open(log, "w") as err:
        done = subprocess.run(
            [*cmd, "--set", "train.max_steps=12"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err
        )
    assert done.returncode == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if line.startswith("train: ")]
    assert len(lines) == 13 and lines[-1].startswith("train: 12/12 steps") and "done in" in lines[-1]
    assert lines[0].startswith("train: 1/12 steps") and "ETA" in lines[0]
    assert all("steps/s" in line and "loss " in line for line in lines[:-1])
    assert "\x1b[" not in log.read_text()  # no terminal control codes in a log
    quiet = subprocess.run(
        [*cmd, "--set", "train.max_steps=1", "--quiet", "--out", str(tmp_path / "q")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert quiet.returncode == 0 and "train: " not in quiet.stderr


def test_score_eval_index_embed_show_progress_unless_quiet(shapes, no_split, tmp_path, monkeypatch):
    monkeypatch.setenv("MMCROSS_PROGRESS_INTERVAL", "0")
    image = str(shapes.parent / "images" / "000.png")
    commands = {
        "scoring: 12/12 rows": ["score", str(no_split), "-o", str(tmp_path / "s.csv"), "-m", "tiny"],
        "eval: encoding: 12/12 images": ["eval", str(no_split), "-m", "tiny", "--split", "all", "--rerank", "0"],
        "embedding: 12/12 images": ["index", str(no_split), "-o", str(tmp_path / "i"), "-m", "tiny", "-j", "0"],
        "embedding: 2/2 items": ["embed", "-m", "tiny", "-i", image, "-t", "a red square", "-o", str(tmp_path / "e")],
    }
    for line, args in commands.items():
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0 and line in shown.output, shown.output
        quiet = runner.invoke(app, [*args, "--quiet", *(["--append"] if args[0] == "index" else [])])
        assert quiet.exit_code == 0 and line.split(":")[0] + ":" not in quiet.output, quiet.output
