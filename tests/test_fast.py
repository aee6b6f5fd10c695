"""The optimised inference path (`mmcross.fast`): int8 graphs close to fp32, the graph cache, manifests, mixed
search, and the fallback when the extra is missing; tiny preset, seeded random init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from index_helpers import make_dataset
from typer.testing import CliRunner

from cli import app
from mmcross import fast
from mmcross.config import InferenceCfg, ModelRef
from mmcross.encode import encode_texts
from mmcross.factory import graph_cache_dir, graph_folders, load_matcher, model_fingerprint, towers_fingerprint
from mmcross.fast.cache import graph

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
needs_fast = pytest.mark.skipif(
    bool(fast.missing_packages("onnx")), reason="the fast extra (pip install -e '.[fast]') is not installed"
)
CAPTIONS = ["a dog", "a red circle left of a blue square", "two people walk on a beach at sunset"]


def _invoke(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def fp32():
    return load_matcher(ModelRef(model="tiny"))


@pytest.fixture(scope="module")
def int8():
    matcher = load_matcher(ModelRef(model="tiny"), inference=InferenceCfg("int8", "onnx"))
    fast.load_graphs(matcher)  # the tests below read the graphs from the cache
    return matcher


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)  # both sides are unit vectors


@needs_fast
def test_int8_vectors_close_to_fp32_both_towers(fp32, int8):
    assert int8.inference == InferenceCfg("int8", "onnx") and fp32.inference == InferenceCfg("fp32", "torch")
    assert fp32.image_encoder.runtime is None and fp32.text_encoder.runtime is None  # the default path is untouched
    pixels = torch.randn(5, 3, *fp32.image_encoder.image_size, generator=torch.Generator().manual_seed(0))
    a, b = fp32.encode_image(pixels), int8.encode_image(pixels)
    assert a.tokens.shape == b.tokens.shape
    assert _cosines(a.pooled, b.pooled).min() > 0.995
    a, b = encode_texts(fp32, CAPTIONS), encode_texts(int8, CAPTIONS)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.mask, b.mask)
    assert _cosines(a.pooled, b.pooled).min() > 0.995
    one = int8.encode_text("a dog")  # batch of one, the shortest caption: the graph's axes are dynamic
    assert _cosines(one.pooled, fp32.encode_text("a dog").pooled).item() > 0.995
    assert model_fingerprint(int8) == model_fingerprint(fp32)  # the weights are the same; only how they run differs


OPENVINO_CHECK = """
import json
import torch
from mmcross.config import InferenceCfg, ModelRef
from mmcross.encode import encode_texts
from mmcross.factory import load_matcher
captions = {captions!r}
fp32 = load_matcher(ModelRef(model="tiny"))
ov = load_matcher(ModelRef(model="tiny"), inference=InferenceCfg("int8", "openvino"))
pixels = torch.randn(5, 3, *fp32.image_encoder.image_size, generator=torch.Generator().manual_seed(0))
a, b = encode_texts(fp32, captions), encode_texts(ov, captions)
i, j = fp32.encode_image(pixels), ov.encode_image(pixels)
one = ov.encode_text("a dog")  # batch of one, the shortest caption: the graph's axes stay dynamic
cosines = {{
    "text": (a.pooled * b.pooled).sum(-1).min().item(),
    "image": (i.pooled * j.pooled).sum(-1).min().item(),
    "one": (one.pooled * fp32.encode_text("a dog").pooled).sum().item(),
}}
print(json.dumps(cosines))
"""


def _run_openvino(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    # In its own process: once OpenVINO's threading runtime is loaded, a later multi-threaded torch training in the
    # same process can crash (seen as a segfault of the test run), so the suite never loads it into pytest itself.
    env = {**os.environ, "MMCROSS_CACHE": str(cache)}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.skipif(bool(fast.missing_packages("openvino", "int8")), reason="openvino or nncf is not installed")
def test_openvino_int8_is_its_own_nncf_graph_cached_and_close_to_fp32(tmp_path, monkeypatch, fp32):
    # the command line first, on an empty cache: NNCF builds the text tower it needs, and stdout stays the JSON lines
    embed = ["cli.py", "embed", "-m", "tiny", "-t", "a dog", "-t", "a cat", "--precision", "int8"]
    done = _run_openvino([*embed, "--runtime", "openvino", "--quiet"], tmp_path)
    assert [json.loads(line)["text"] for line in done.stdout.splitlines()] == ["a dog", "a cat"]
    assert "built the int8 text graph for openvino" in done.stderr and "image graph" not in done.stderr
    assert "Weight Compression" not in done.stderr  # NNCF's own progress bar: --quiet means none
    # both towers: the image graph is built at its first use, the text graph read from the cache
    done = _run_openvino(["-c", OPENVINO_CHECK.format(captions=CAPTIONS)], tmp_path)
    assert "built the int8 image graph for openvino" in done.stderr and "text graph" not in done.stderr
    assert min(json.loads(done.stdout.strip().splitlines()[-1]).values()) > 0.995
    monkeypatch.setenv("MMCROSS_CACHE", str(tmp_path))  # where the subprocesses put their graphs
    folder = graph_cache_dir(ModelRef(model="tiny"), fp32)
    names = {p.name for p in folder.iterdir()}
    assert {"image-int8-openvino.xml", "image-int8-openvino.bin", "text-int8-openvino.json"} <= names
    assert "image-int8.onnx" not in names  # ONNX Runtime's int8 graph is not what OpenVINO runs
    key = json.loads((folder / "image-int8-openvino.json").read_text())
    assert key["runtime"] == "openvino" and {"openvino", "nncf"} <= set(key["versions"])
    assert {"sha256", "sha256_bin"} <= set(key)

    # a damaged weights file is rebuilt; the text graph, intact, is reused; the vectors stay close to torch fp32
    weights = folder / "image-int8-openvino.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = _run_openvino(["-c", OPENVINO_CHECK.format(captions=CAPTIONS)], tmp_path)
    assert "built the int8 image graph for openvino" in done.stderr
    assert "text graph" not in done.stderr and "built the fp32" not in done.stderr  # nothing else converted again
    cosines = json.loads(done.stdout.strip().splitlines()[-1])
    assert min(cosines.values()) > 0.995, cosines


@needs_fast
def test_graph_cache_reused_then_rebuilt_when_stale_or_damaged(fp32, int8, capsys):
    folder = graph_cache_dir(ModelRef(model="tiny"), fp32)
    fingerprint = towers_fingerprint(fp32)
    path = graph(fp32, "image", "int8", folder, fingerprint)  # built by the `int8` fixture
    capsys.readouterr()
    assert graph(fp32, "image", "int8", folder, fingerprint) == path
    assert "built" not in capsys.readouterr().err  # reused: nothing converted
    key_path = path.with_suffix(".json")
    key = json.loads(key_path.read_text())
    assert key["fingerprint"] == fingerprint and key["preset"] == "tiny" and key["image_size"] == [64, 64]
    assert set(key["versions"]) == {"torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime"}

    key_path.write_text(json.dumps({**key, "code": "0" * 16}))  # exported by another mmcross
    graph(fp32, "image", "int8", folder, fingerprint)
    assert "built the int8 image graph" in capsys.readouterr().err

    key_path.write_text(json.dumps({**key, "versions": {**key["versions"], "onnxruntime": "0.0"}}))
    graph(fp32, "image", "int8", folder, fingerprint)
    assert "built the int8 image graph" in capsys.readouterr().err  # another runtime version: rebuilt
    assert json.loads(key_path.read_text())["versions"] == key["versions"]

    path.write_bytes(path.read_bytes()[:1000])  # a truncated (or foreign) file under the right name
    graph(fp32, "image", "int8", folder, fingerprint)
    assert "built the int8 image graph" in capsys.readouterr().err

    other = load_matcher(ModelRef(model="tiny", overrides={"encoder.seed": 1}))
    assert graph_cache_dir(ModelRef(model="tiny"), other) != folder  # other weights, another folder


@needs_fast
def test_graphs_depend_on_the_towers_alone_and_int8_quantises_matrix_products_only(fp32, int8, capsys):
    import onnx

    other_fusion = load_matcher(ModelRef(model="tiny", overrides={"fusion.seed": 1}))
    assert model_fingerprint(other_fusion) != model_fingerprint(fp32)
    assert towers_fingerprint(other_fusion) == towers_fingerprint(fp32)
    folder = graph_cache_dir(ModelRef(model="tiny"), fp32)
    assert graph_cache_dir(ModelRef(model="tiny"), other_fusion) == folder
    capsys.readouterr()
    fast.use_inference(other_fusion, InferenceCfg("int8", "onnx"), ModelRef(model="tiny"))
    assert "built" not in capsys.readouterr().err  # the int8 fixture's graphs serve another fusion on the same towers
    for tower in ("image", "text"):
        ops = {node.op_type for node in onnx.load(folder / f"{tower}-int8.onnx").graph.node}
        assert "MatMulInteger" in ops and "ConvInteger" not in ops, ops  # ConvInteger is slow on a CPU


@needs_fast
def test_a_graphs_folder_that_cannot_be_written_is_read_and_new_graphs_go_to_the_cache(
    tmp_path, monkeypatch, fp32, int8, capsys
):
    from mmcross.factory import save_checkpoint

    source = graph_cache_dir(ModelRef(model="tiny"), fp32)  # the int8 fixture's graphs
    save_checkpoint(fp32, tmp_path / "run" / "best.safetensors")
    ref = ModelRef(checkpoint=str(tmp_path / "run"))
    beside = tmp_path / "run" / "best.graphs"
    assert graph_folders(ref, fp32) == [beside]
    beside.mkdir()
    for name in ("image-fp32.onnx", "image-fp32.json"):  # a valid image graph, no text graph
        (beside / name).write_bytes((source / name).read_bytes())
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == beside else access(path, mode))
    monkeypatch.setenv("MMCROSS_CACHE", str(tmp_path / "cache"))
    *read_first, build_in = graph_folders(ref, fp32)
    assert read_first == [beside] and build_in.parent == tmp_path / "cache" / "graphs"
    fingerprint = towers_fingerprint(fp32)
    capsys.readouterr()
    assert graph(fp32, "image", "fp32", build_in, fingerprint, read_first) == beside / "image-fp32.onnx"
    assert graph(fp32, "text", "fp32", build_in, fingerprint, read_first) == build_in / "text-fp32.onnx"
    assert capsys.readouterr().err.count("built") == 1  # the text graph only, in the cache


def test_graphs_sit_beside_a_checkpoint(tmp_path, fp32):
    from mmcross.factory import save_checkpoint

    save_checkpoint(fp32, tmp_path / "run" / "best.safetensors")
    assert graph_cache_dir(ModelRef(checkpoint=str(tmp_path / "run")), fp32) == tmp_path / "run" / "best.graphs"


@needs_fast
def test_index_int8_manifest_and_mixed_precision_search(tmp_path, int8):
    dataset = make_dataset(tmp_path / "ds", n=6, missing=False)
    out = tmp_path / "idx"
    _invoke(["index", str(dataset), "--out", str(out), "-m", "tiny", "-j", "0", "--precision", "int8"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inference"] == {"precision": "int8", "runtime": "onnx"}

    same = _invoke(["search", str(out), "--text", "a red circle", "--k", "3", "--json"])
    assert "close, not equal" not in same.stderr  # queries default to the index's own precision
    # naming only the runtime keeps the index's precision (--help: "default: as the index was built")
    same = _invoke(["search", str(out), "--text", "a red circle", "--k", "3", "--json", "--runtime", "onnx"])
    assert "close, not equal" not in same.stderr
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\na blue square\n")
    mixed = _invoke(["search", str(out), "--queries", str(queries), "--k", "3", "--json", "--precision", "fp32"])
    assert mixed.stderr.count("holds int8 (onnx) vectors, the queries are encoded fp32 (torch)") == 1
    answers = json.loads(mixed.stdout)
    assert [len(a["hits"]) for a in answers] == [3, 3]
    fast._said.clear()  # the note is said once per process: this one again
    torch32 = _invoke(["search", str(out), "--text", "a red circle", "--k", "3", "--json", "--runtime", "torch"])
    assert "the queries are encoded fp32 (torch)" in torch32.stderr  # torch runs fp32 only: not refused as int8
    refused = runner.invoke(app, ["search", str(out), "--text", "x", "--set", "encoder.seed=1"])
    assert refused.exit_code == 2 and "differs in encoder.seed" in refused.stderr  # another model: refused

    again = runner.invoke(app, ["index", str(dataset), "--out", str(out), "-m", "tiny", "-j", "0", "--append"])
    assert again.exit_code == 2 and "another precision/runtime" in again.stderr and "int8 (onnx)" in again.stderr


@needs_fast
def test_eval_reports_int8(tmp_path, int8):
    dataset = make_dataset(tmp_path / "ds", n=4, missing=False)
    result = _invoke(["eval", str(dataset), "--split", "all", "-m", "tiny", "--precision", "int8", "--quiet"])
    assert json.loads(result.stdout)["inference"] == {"precision": "int8", "runtime": "onnx"}


def test_missing_extra_falls_back_to_torch_in_one_line(monkeypatch):
    monkeypatch.setattr(fast, "missing_packages", lambda runtime, precision="fp32": ["onnxruntime"])
    monkeypatch.setattr(fast, "_said", set())
    result = _invoke(["embed", "-m", "tiny", "-t", "a dog", "-t", "a cat", "--precision", "int8", "--quiet"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "note: --runtime onnx needs onnxruntime (the fast extra: pip install -e '.[fast]' in mmcross's folder); "
        "running torch fp32 instead"
    ]
    plain = _invoke(["embed", "-m", "tiny", "-t", "a dog", "-t", "a cat", "--quiet"])
    assert result.stdout == plain.stdout  # what ran is exactly the fp32 path


def test_help_names_the_extra():
    # rich, which renders typer's help, reads "[fast]" as a style tag unless escaped: the help said "pip install
    # 'mmcross'"; and mmcross is not on the package registry, so the line names the editable install of the checkout
    for command in ("index", "search", "embed", "score", "eval"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0
        if command != "search":  # search's --precision defaults to the index's and names no extra
            assert "pip install -e '.[fast]'" in result.output, command


def test_int8_on_torch_and_unknown_values_are_refused():
    result = runner.invoke(app, ["embed", "-m", "tiny", "-t", "a dog", "--precision", "int8", "--runtime", "torch"])
    assert result.exit_code == 2 and "int8 runs on --runtime onnx or openvino" in result.stderr
    result = runner.invoke(app, ["embed", "-m", "tiny", "-t", "a dog", "--precision", "fp16"])
    assert result.exit_code == 2 and "--precision takes fp32 or int8" in result.stderr


@needs_fast
def test_fp32_graph_matches_torch_closely(fp32):
    onnx32 = load_matcher(ModelRef(model="tiny"), inference=InferenceCfg("fp32", "onnx"))
    a, b = encode_texts(fp32, CAPTIONS), encode_texts(onnx32, CAPTIONS)
    np.testing.assert_allclose(a.pooled.numpy(), b.pooled.numpy(), atol=1e-4)


@needs_fast
def test_int8_with_the_model_on_a_gpu_names_what_the_user_typed(monkeypatch):
    from mmcross.model import Matcher

    matcher = load_matcher(ModelRef(model="tiny"))
    monkeypatch.setattr(Matcher, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(
        ValueError, match=r"--precision int8 \(runtime onnx\) runs the encoders on the CPU.*--device cpu"
    ):
        fast.use_inference(matcher, InferenceCfg("int8", "auto"), ModelRef(model="tiny"))


@needs_fast
def test_a_tower_is_converted_when_it_first_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCROSS_CACHE", str(tmp_path))
    result = _invoke(["embed", "-m", "tiny", "-t", "a dog", "--runtime", "onnx", "--quiet"])
    assert "built the fp32 text graph" in result.stderr and "image graph" not in result.stderr  # captions only
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["text-fp32.onnx"]


@needs_fast
def test_two_builds_of_one_graph_take_turns_and_the_second_reads_the_first(tmp_path, monkeypatch, fp32, capsys):
    import threading

    from mmcross.fast import cache

    fingerprint = towers_fingerprint(fp32)
    source = graph(fp32, "image", "fp32", tmp_path / "source", fingerprint)
    folder = tmp_path / "shared"
    folder.mkdir()
    missed = threading.Event()
    first_hit = cache._first_hit

    def first_hit_then_tell(*args, **kwargs):
        hit = first_hit(*args, **kwargs)
        missed.set()
        return hit

    monkeypatch.setattr(cache, "_first_hit", first_hit_then_tell)
    capsys.readouterr()
    got = []
    with cache._building(folder, "image-fp32"):  # another process building this graph
        waiting = threading.Thread(target=lambda: got.append(graph(fp32, "image", "fp32", folder, fingerprint)))
        waiting.start()
        assert missed.wait(60)  # it found no graph and now waits for the lock
        for name in ("image-fp32.onnx", "image-fp32.json"):  # the other build's result appears
            (folder / name).write_bytes((source.parent / name).read_bytes())
    waiting.join(60)
    assert got == [folder / "image-fp32.onnx"]
    assert "built" not in capsys.readouterr().err  # it read the other build's graph instead of building its own
