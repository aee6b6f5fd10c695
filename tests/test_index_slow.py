"""Index jobs that need subprocesses or 100k vectors: SIGKILL + --resume, torchrun (gloo), faiss IVF recall."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import make_dataset

from mmcross.index.search import build_faiss, exact_search, faiss_search

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _index_cmd(dataset, out, *extra):
    cli = str(ROOT / "cli.py")
    return [PY, cli, "index", str(dataset), "--out", str(out), "--model", "tiny", "-j", "0", *extra]


def _same(a: Path, b: Path) -> None:
    from mmcross.index.store import IndexStore

    sa, sb = IndexStore(a), IndexStore(b)
    assert sa.img_emb.shape == sb.img_emb.shape and np.allclose(sa.img_emb, sb.img_emb, atol=1e-6)
    assert sa.text_emb.shape == sb.text_emb.shape and np.allclose(sa.text_emb, sb.text_emb, atol=1e-6)
    assert sa.metadata.to_pylist() == sb.metadata.to_pylist()
    assert sa.text_metadata.to_pylist() == sb.text_metadata.to_pylist()
    assert sa.manifest["fingerprint"] == sb.manifest["fingerprint"]
    assert sa.manifest["shard_counts"] == sb.manifest["shard_counts"]
    for n in sa.shards:  # the re-ranking cache too
        name = f"img_tokens/img_tokens_{n}.npy"
        assert np.allclose(np.load(a / name), np.load(b / name), atol=1e-3)


@pytest.mark.slow
def test_sigkill_mid_job_then_resume_equals_uninterrupted_run(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=80)
    args = ("--shard-size", "4", "--batch-size", "1")
    subprocess.run(_index_cmd(dataset, tmp_path / "ref", *args), check=True, cwd=ROOT, capture_output=True)
    out = tmp_path / "killed"
    cmd = _index_cmd(dataset, out, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("shard_*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("shard_*.json")))
    assert 3 <= done < 20 and not (out / "manifest.json").exists()
    result = subprocess.run(_index_cmd(dataset, out, *args, "--resume"), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob("*.tmp"))
    _same(tmp_path / "ref", out)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_equals_one_process(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=20)
    args = ("--shard-size", "3")
    subprocess.run(_index_cmd(dataset, tmp_path / "one", *args), check=True, cwd=ROOT, capture_output=True)
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    cmd = torchrun + _index_cmd(dataset, tmp_path / "two", *args)[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stdout and "rank 1/2" in result.stdout
    _same(tmp_path / "one", tmp_path / "two")


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / ref.shape[1] for a, b in zip(ids, ref)]))


def clustered(n: int, dim: int, seed: int = 0, queries: int = 200, k: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """n random unit vectors around k random centres (as embeddings cluster), and queries drawn the same way."""
    g = np.random.default_rng(seed)
    centres = _unit(g.standard_normal((k, dim)))
    x = _unit(centres[g.integers(0, k, n)] + 0.04 * g.standard_normal((n, dim)))
    q = _unit(centres[g.integers(0, k, queries)] + 0.04 * g.standard_normal((queries, dim)))
    return x, q


@pytest.mark.slow
def test_faiss_ivf_recall_at_10_on_100k_random_vectors():
    pytest.importorskip("faiss")
    x, q = clustered(100_000, 512)
    _, ref = exact_search(x, q, 10)
    _, ids = faiss_search(build_faiss(x, "ivf"), q, 10)
    assert _recall(ids, ref) >= 0.95
    # structureless uniform random vectors: IVF needs most lists for the same recall
    g = np.random.default_rng(1)
    x, q = _unit(g.standard_normal((100_000, 512))), _unit(g.standard_normal((50, 512)))
    _, ref = exact_search(x, q, 10)
    index = build_faiss(x, "ivf", nlist=256)
    _, ids = faiss_search(index, q, 10, nprobe=240)
    assert _recall(ids, ref) >= 0.95


def test_faiss_backends_agree_with_exact_on_small_sets():
    pytest.importorskip("faiss")
    x, q = clustered(5000, 32, queries=50, k=50)
    _, ref = exact_search(x, q, 10)
    assert _recall(faiss_search(build_faiss(x, "flat"), q, 10)[1], ref) == 1.0
    assert _recall(faiss_search(build_faiss(x, "ivf"), q, 10)[1], ref) >= 0.95
    assert _recall(faiss_search(build_faiss(x, "hnsw"), q, 10)[1], ref) >= 0.95
