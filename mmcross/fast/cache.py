"""Exported graphs on disk, each checked by a key file before use.

A graph `{tower}-{precision}.onnx` sits in a cache folder (next to the weights it came from, see
`mmcross.factory.graph_cache_dir`) with `{tower}-{precision}.json` beside it: the weights' fingerprint, preset,
architecture, image size, the versions of the exporter and quantiser, and the graph's sha256. A graph is used only
when every field matches and the file's hash is the recorded one; otherwise (other weights, another version, a
truncated or foreign file) it is rebuilt. ONNX files hold tensors and a graph, no Python objects: nothing unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

FORMAT = "mmcross.graph"


def versions() -> dict[str, str]:
    """What the graph bytes depend on besides the weights: the exporter and quantiser versions."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime")}


def key_of(matcher, tower: str, precision: str, fingerprint: str) -> dict:
    cfg = matcher.cfg
    return {
        "format": FORMAT,
        "tower": tower,
        "precision": precision,
        "fingerprint": fingerprint,
        "preset": cfg.name,
        "architecture": cfg.encoder.model_name,
        "image_size": list(matcher.image_encoder.image_size),
        "versions": versions(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(folder: Path, name: str, key: dict) -> Path | None:
    """The graph `name` in `folder` if its key file matches `key` and its bytes match the key's hash, else None."""
    path, key_path = folder / f"{name}.onnx", folder / f"{name}.json"
    try:
        stored = json.loads(key_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or {k: stored.get(k) for k in key} != key or not path.is_file():
        return None
    return path if stored.get("sha256") == _sha256(path) else None


def graph(matcher, tower: str, precision: str, folder: str | Path, fingerprint: str) -> Path:
    """The ONNX graph of `matcher`'s `tower` ("image" or "text") at `precision`, from `folder` or built into it.

    Building says so on stderr with the seconds it took (conversion is paid once per weights).
    """
    from mmcross.fast import note
    from mmcross.fast.export import export_tower, quantize_int8

    folder = Path(folder)
    name = f"{tower}-{precision}"
    key = key_of(matcher, tower, precision, fingerprint)
    hit = cached(folder, name, key)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = folder / f".{name}.{os.getpid()}.onnx"
    try:
        if precision == "fp32":
            export_tower(matcher, tower, tmp)
        else:
            fp32 = graph(matcher, tower, "fp32", folder, fingerprint)
            quantize_int8(fp32, tmp)
        path = folder / f"{name}.onnx"
        os.replace(tmp, path)  # the key file goes last: a graph without a matching key is never used
    finally:
        tmp.unlink(missing_ok=True)
    key_tmp = folder / f".{name}.{os.getpid()}.json"
    key_tmp.write_text(json.dumps({**key, "sha256": _sha256(path)}, indent=2))
    os.replace(key_tmp, folder / f"{name}.json")
    note(f"built the {precision} {tower} graph in {time.perf_counter() - start:.1f}s -> {path} (cached)", once=False)
    return path
