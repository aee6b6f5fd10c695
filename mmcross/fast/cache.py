"""Exported graphs on disk, each checked by a key file before use.

A graph `{tower}-{precision}.onnx` sits in a cache folder (next to the weights it came from, see
`mmcross.factory.graph_folders`) with `{tower}-{precision}.json` beside it: the towers' weights fingerprint, preset,
architecture, image size, token stage, the versions of torch, open_clip, the exporter and quantiser, a hash of the
mmcross code the graph is traced from, and the graph's sha256. A graph
is used only when every field matches and the file's hash is the recorded one; otherwise (other weights, another
version, a truncated or foreign file) it is rebuilt. ONNX files hold tensors and a graph, no Python objects:
nothing unpickles.

OpenVINO's int8 graph is its own: `{tower}-int8-openvino.xml` + `.bin` (OpenVINO IR: an XML graph and raw weight
bytes), NNCF's weight compression of the fp32 ONNX graph, keyed the same way plus the openvino and nncf versions and
the sha256 of both files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

FORMAT = "mmcross.graph/2"  # 2: int8 ONNX graphs quantise matrix products only (`export.quantize_int8`)


ONNX_TOOLS = ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime")
# the code a graph is traced from: the towers' forward and the export wrappers (FORMAT is bumped by hand; this
# catches an edit that forgot to)
_TRACED = ("encoders.py", "fast/export.py")
OPENVINO_TOOLS = (*ONNX_TOOLS, "openvino", "nncf")


def versions(tools: tuple[str, ...] = ONNX_TOOLS) -> dict[str, str]:
    """What the graph bytes depend on besides the weights: the exporter and quantiser versions."""
    from importlib.metadata import version

    return {name: version(name) for name in tools}


@functools.cache
def code_hash() -> str:
    """sha256 (16 hex digits) of the mmcross sources a graph is traced from (read once per process)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in _TRACED:
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def key_of(matcher, tower: str, precision: str, fingerprint: str, tools: tuple[str, ...] = ONNX_TOOLS) -> dict:
    cfg = matcher.cfg
    return {
        "format": FORMAT,
        "tower": tower,
        "precision": precision,
        "fingerprint": fingerprint,
        "preset": cfg.name,
        "architecture": cfg.encoder.model_name,
        "image_size": list(matcher.image_encoder.image_size),
        "token_stage": matcher.image_encoder.token_stage,  # which map the image graph returns as tokens
        "versions": versions(tools),
        "code": code_hash(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(path: Path) -> dict[str, str]:
    """sha256 of a graph's files: the `.onnx` file alone, or an OpenVINO `.xml` and its `.bin`."""
    hashes = {"sha256": _sha256(path)}
    if path.suffix == ".xml":
        hashes["sha256_bin"] = _sha256(path.with_suffix(".bin"))
    return hashes


def _first_hit(folders: Sequence[Path], name: str, key: dict, suffix: str = ".onnx") -> Path | None:
    return next((hit for f in folders if (hit := cached(Path(f), name, key, suffix)) is not None), None)


def cached(folder: Path, name: str, key: dict, suffix: str = ".onnx") -> Path | None:
    """The graph `name` in `folder` if its key file matches `key` and its bytes match the key's hashes, else None."""
    path, key_path = folder / f"{name}{suffix}", folder / f"{name}.json"
    try:
        stored = json.loads(key_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or {k: stored.get(k) for k in key} != key or not path.is_file():
        return None
    if suffix == ".xml" and not path.with_suffix(".bin").is_file():
        return None
    hashes = _hashes(path)
    return path if {k: stored.get(k) for k in hashes} == hashes else None


def _write_key(folder: Path, name: str, key: dict, path: Path) -> None:
    key_tmp = folder / f".{name}.{os.getpid()}.json"
    key_tmp.write_text(json.dumps({**key, **_hashes(path)}, indent=2))
    os.replace(key_tmp, folder / f"{name}.json")  # the key file goes last: a graph without a matching key is unused


@contextmanager
def _building(folder: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder/.{name}.lock` while graph `name` is built into `folder`.

    Two processes that need the same graph take turns, and the second reads the first's. Without it, OpenVINO's
    `.xml` and `.bin` (two renames) could end up one from each build. No lock where `fcntl` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def graph(
    matcher, tower: str, precision: str, folder: str | Path, fingerprint: str, read_first: Sequence[Path] = ()
) -> Path:
    """The ONNX graph of `matcher`'s `tower` ("image" or "text") at `precision`, from `read_first` or `folder`, or
    built into `folder`.

    Building says so on stderr with the seconds it took (conversion is paid once per weights).
    """
    from mmcross.fast import note
    from mmcross.fast.export import export_tower, quantize_int8

    folder = Path(folder)
    name = f"{tower}-{precision}"
    key = key_of(matcher, tower, precision, fingerprint)
    hit = _first_hit([*read_first, folder], name, key)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    # an int8 graph is made from the fp32 one, which says its own seconds: the note below counts this step only
    fp32 = graph(matcher, tower, "fp32", folder, fingerprint, read_first) if precision != "fp32" else None
    with _building(folder, name):
        hit = cached(folder, name, key)  # built by another process while this one waited
        if hit is not None:
            return hit
        start = time.perf_counter()
        tmp = folder / f".{name}.{os.getpid()}.onnx"
        try:
            if fp32 is None:
                export_tower(matcher, tower, tmp)
            else:
                quantize_int8(fp32, tmp)
            path = folder / f"{name}.onnx"
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _write_key(folder, name, key, path)
    note(f"built the {precision} {tower} graph in {time.perf_counter() - start:.1f}s -> {path} (cached)", once=False)
    return path


def openvino_int8_graph(
    matcher, tower: str, folder: str | Path, fingerprint: str, read_first: Sequence[Path] = ()
) -> Path:
    """OpenVINO's int8 graph of `tower` (the `.xml`; its `.bin` beside it), from `read_first` or `folder`, or built
    into `folder` from the fp32 ONNX graph by NNCF's weight compression (`mmcross.fast.export.compress_int8_openvino`).

    Imports openvino and nncf: call it where OpenVINO may be loaded (see `mmcross.fast.sessions`).
    """
    from mmcross.fast import note
    from mmcross.fast.export import compress_int8_openvino

    folder = Path(folder)
    name = f"{tower}-int8-openvino"
    key = key_of(matcher, tower, "int8", fingerprint, OPENVINO_TOOLS) | {"runtime": "openvino"}
    hit = _first_hit([*read_first, folder], name, key, ".xml")
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = graph(matcher, tower, "fp32", folder, fingerprint, read_first)  # says its own seconds
    with _building(folder, name):
        hit = cached(folder, name, key, ".xml")  # built by another process while this one waited
        if hit is not None:
            return hit
        start = time.perf_counter()
        tmp = folder / f".{name}.{os.getpid()}.xml"
        path = folder / f"{name}.xml"
        try:
            compress_int8_openvino(fp32, tmp)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # the weights first, then the graph
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".bin").unlink(missing_ok=True)
        _write_key(folder, name, key, path)
    seconds = time.perf_counter() - start
    note(f"built the int8 {tower} graph for openvino in {seconds:.1f}s -> {path} (cached)", once=False)
    return path
