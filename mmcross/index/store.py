"""The on-disk index: clip-retrieval's layout plus a token cache, per-shard done markers and a manifest.

An index directory::

    img_emb/img_emb_{n}.npy                (N_n, E) float32 unit image vectors, shard n       (clip-retrieval)
    text_emb/text_emb_{n}.npy              (M_n, E) float32 unit caption vectors, input order   (clip-retrieval)
    metadata/metadata_{n}.parquet          one row per img_emb row: image_id, path, split, caption (first one)
    text_metadata/text_metadata_{n}.parquet  one row per text_emb row: image_id, caption, caption_index
    img_tokens/img_tokens_{n}.npy          (N_n, P, Dv) float16 encoder patch tokens (the re-ranking cache)
    text_tokens/text_tokens_{n}.npy        (M_n, L_n, Dt) float16 caption token states, zero-padded per shard
    text_tokens/text_mask_{n}.npy          (M_n, L_n) bool, True at real tokens
    shards/shard_{n}.json                  done marker: counts of shard n and its job (written last, after its files)
    faiss/{image,text}.index               optional faiss indexes (`--faiss flat|ivf|hnsw`)
    build.json                             the job: options, model, fingerprint, record count (for --resume)
    manifest.json                          written when every shard is done: model, fingerprint, counts, dims
    rejects.jsonl                          images and captions that could not be used

With `--no-images` the metadata rows list the records (there is no img_emb). Every file is written under a
temporary name and renamed, so a killed job leaves either the whole file or nothing under the real name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

MANIFEST = "manifest.json"
BUILD = "build.json"
REJECTS = "rejects.jsonl"
# the layout's folders (above), each holding one kind of shard file
FOLDERS = ("img_emb", "text_emb", "metadata", "text_metadata", "img_tokens", "text_tokens", "shards", "faiss")
FORMAT, FORMAT_VERSION = "mmcross.index", "1"


def shard_path(root: Path, kind: str, n: int, suffix: str) -> Path:
    """`root/kind/kind_{n}.suffix`, e.g. img_emb/img_emb_3.npy."""
    folder = {"text_mask": "text_tokens", "text_metadata": "text_metadata"}.get(kind, kind)
    return root / folder / f"{kind}_{n}.{suffix}"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def atomic_create_json(path: Path, obj: Any) -> bool:
    """Write `obj` to `path` unless it exists; False when it does. Whole or nothing, and of two processes creating
    the same path at once exactly one succeeds (a hard link, unlike a rename, never replaces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: a rename, a race only for processes starting together
        if path.exists():
            return False
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    pq.write_table(table, tmp)
    tmp.replace(path)


@dataclass
class Shard:
    """What one shard holds, in memory, before it is written."""

    n: int  # shard number (global over ranks)
    metadata: pa.Table  # one row per image (or per record with --no-images)
    text_metadata: pa.Table | None  # one row per caption
    img_emb: np.ndarray | None = None  # (N, E) float32
    text_emb: np.ndarray | None = None  # (M, E) float32
    img_tokens: np.ndarray | None = None  # (N, P, Dv) float16
    text_tokens: np.ndarray | None = None  # (M, L, Dt) float16
    text_mask: np.ndarray | None = None  # (M, L) bool
    rejects: list[dict] = field(default_factory=list)  # reject records of this shard's images
    job: dict | None = None  # what the job that built it embeds, and how (`mmcross.index.build.shard_job`)


def write_shard(root: Path, shard: Shard) -> dict:
    """Write every file of a shard atomically, then its done marker; returns the marker's content."""
    n = shard.n
    arrays = {
        "img_emb": shard.img_emb,
        "text_emb": shard.text_emb,
        "img_tokens": shard.img_tokens,
        "text_tokens": shard.text_tokens,
        "text_mask": shard.text_mask,
    }
    for kind, array in arrays.items():
        if array is not None:
            atomic_save_npy(shard_path(root, kind, n, "npy"), array)
    atomic_write_parquet(shard_path(root, "metadata", n, "parquet"), shard.metadata)
    if shard.text_metadata is not None:
        atomic_write_parquet(shard_path(root, "text_metadata", n, "parquet"), shard.text_metadata)
    marker = {
        "shard": n,
        "records": shard.metadata.num_rows if shard.img_emb is None else None,
        "images": 0 if shard.img_emb is None else int(shard.img_emb.shape[0]),
        "captions": 0 if shard.text_emb is None else int(shard.text_emb.shape[0]),
        "rejects": shard.rejects,
        "job": shard.job,
    }
    atomic_write_json(root / "shards" / f"shard_{n}.json", marker)
    return marker


def done_shards(root: Path) -> dict[int, dict]:
    """The done markers of `root`, by shard number."""
    out = {}
    for path in (Path(root) / "shards").glob("shard_*.json"):
        out[int(path.stem.split("_")[1])] = json.loads(path.read_text())
    return out


def read_manifest(root: str | Path) -> dict:
    """The manifest of a finished index; FileNotFoundError naming what is wrong otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / BUILD).is_file():
            raise FileNotFoundError(
                f"index {root} is incomplete (no {MANIFEST}); finish it with `mmcross index --resume`"
            )
        raise FileNotFoundError(f"no index at {root} (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mmcross index manifest")
    return manifest


class DamagedIndex(ValueError):
    """An index whose shard files are missing, short or unreadable."""


def npy_rows(path: Path) -> int:
    """Rows of a `.npy` file from its header alone; ValueError when the file is shorter than its header says."""
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, EOFError) as err:
            raise ValueError(f"is not a readable .npy file ({err})") from None
        need = f.tell() + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise ValueError(f"is truncated ({size:,} of {need:,} bytes)")
    return int(shape[0]) if shape else 0


def parquet_rows(path: Path) -> int:
    """Rows of a parquet file from its footer; ValueError when the footer cannot be read."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"is not a readable parquet file ({err})") from None


def expected_files(counts: dict, flags: dict) -> dict[tuple[str, str], int | None]:
    """The files a shard must hold, {(kind, suffix): rows (None = not known)}, from its counts (images, captions,
    records) and the job's flags (embed_images, embed_captions, cache_tokens)."""
    images, captions = counts.get("images", 0), counts.get("captions", 0)
    out: dict[tuple[str, str], int | None] = {}
    if flags["embed_images"]:
        out[("metadata", "parquet")] = out[("img_emb", "npy")] = images
        if flags["cache_tokens"] and images:  # an empty shard writes no token file
            out[("img_tokens", "npy")] = images
    else:
        out[("metadata", "parquet")] = counts.get("records")
    if flags["embed_captions"]:
        out[("text_metadata", "parquet")] = out[("text_emb", "npy")] = captions
        if flags["cache_tokens"] and captions:
            out[("text_tokens", "npy")] = out[("text_mask", "npy")] = captions
    return out


def shard_problems(root: Path, n: int, counts: dict, flags: dict) -> list[str]:
    """What is wrong with shard `n`'s files (missing, unreadable, truncated, other row counts); empty when sound.

    Reads only `.npy` headers and parquet footers, so checking a large index costs a few reads per shard.
    """
    problems = []
    for (kind, suffix), rows in expected_files(counts, flags).items():
        path = shard_path(root, kind, n, suffix)
        name = path.relative_to(root).as_posix()
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            found = npy_rows(path) if suffix == "npy" else parquet_rows(path)
        except ValueError as err:
            problems.append(f"{name} {err}")
            continue
        if rows is not None and found != rows:
            problems.append(f"{name} has {found:,} rows, not {rows:,}")
    return problems


def check_index(root: Path, manifest: dict) -> None:
    """Refuse an index whose files do not match its manifest (see `shard_problems`), naming the first problem."""
    problems, damaged = [], []
    for n in manifest["shards"]:
        found = shard_problems(root, n, manifest["shard_counts"][str(n)], manifest)
        problems += found
        damaged += [n] * bool(found)
    problems += [f"{rel} is missing" for rel in manifest.get("faiss", {}).values() if not (root / rel).is_file()]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        dataset = manifest.get("dataset", "DATASET")
        earlier = sorted(set(damaged) & set(_base_shards(root)))
        if earlier:  # --resume rebuilds the last job's shards only (`build._sound_shards`)
            raise DamagedIndex(
                f"index {root} is damaged: {problems[0]}{more}; shard {earlier[0]} was built before the last "
                f"--append, which --resume cannot rebuild: build the index again in a new folder"
            )
        raise DamagedIndex(
            f"index {root} is damaged: {problems[0]}{more}; rebuild the damaged shards with "
            f"`mmcross index {dataset} --out {root} --resume` and the options that built it"
        )


def _base_shards(root: Path) -> list[int]:
    """The shards the last job found already built (its --append base), from its build record."""
    try:
        return list(json.loads((root / BUILD).read_text()).get("base_shards") or [])
    except (OSError, ValueError, AttributeError):
        return []


def concat_npy(root: Path, kind: str, shards: list[int], mmap: bool = False) -> np.ndarray | None:
    parts = [shard_path(root, kind, n, "npy") for n in shards]
    parts = [p for p in parts if p.is_file()]
    if not parts:
        return None
    arrays = [np.load(p, mmap_mode="r" if mmap else None) for p in parts]
    return np.concatenate(arrays) if len(arrays) > 1 else np.asarray(arrays[0])


class IndexStore:
    """Read access to a finished index: vectors, metadata, and cached token rows for re-ranking."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        check_index(self.root, self.manifest)
        self.shards: list[int] = sorted(self.manifest["shards"])
        self._img_emb: np.ndarray | None = None
        self._text_emb: np.ndarray | None = None
        self._meta: pa.Table | None = None
        self._text_meta: pa.Table | None = None

    @property
    def img_emb(self) -> np.ndarray | None:
        """(N, E) float32 image vectors in shard order; None when the index holds no images."""
        if self._img_emb is None:
            self._img_emb = concat_npy(self.root, "img_emb", self.shards)
        return self._img_emb

    @property
    def text_emb(self) -> np.ndarray | None:
        """(M, E) float32 caption vectors in input order; None when the index holds no captions."""
        if self._text_emb is None:
            self._text_emb = concat_npy(self.root, "text_emb", self.shards)
        return self._text_emb

    @property
    def metadata(self) -> pa.Table:
        """One row per image (image_id, path, split, caption)."""
        if self._meta is None:
            self._meta = pa.concat_tables(
                [pq.read_table(shard_path(self.root, "metadata", n, "parquet")) for n in self.shards]
            )
        return self._meta

    @property
    def text_metadata(self) -> pa.Table | None:
        """One row per caption (image_id, caption, caption_index); None without captions."""
        if self._text_meta is None:
            paths = [shard_path(self.root, "text_metadata", n, "parquet") for n in self.shards]
            if not any(p.is_file() for p in paths):
                return None
            self._text_meta = pa.concat_tables([pq.read_table(p) for p in paths if p.is_file()])
        return self._text_meta

    def _rows(self, kind: str, counts_key: str, rows: np.ndarray) -> list[np.ndarray]:
        """Rows (global numbers) of a per-shard token array, read through memory maps; padded pieces."""
        counts = [self.manifest["shard_counts"][str(n)][counts_key] for n in self.shards]
        starts = np.cumsum([0, *counts])
        out = []
        for row in rows.tolist():
            s = int(np.searchsorted(starts, row, side="right") - 1)
            array = np.load(shard_path(self.root, kind, self.shards[s], "npy"), mmap_mode="r")
            out.append(np.asarray(array[row - starts[s]]))
        return out

    def image_tokens(self, rows: np.ndarray) -> torch.Tensor:
        """(K, P, Dv) cached patch tokens of image rows `rows`."""
        self._need_tokens()
        return torch.from_numpy(np.stack(self._rows("img_tokens", "images", rows)))

    def text_tokens(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, L, Dt) cached token states and (K, L) masks of caption rows `rows`, padded to the longest."""
        self._need_tokens()
        tokens = self._rows("text_tokens", "captions", rows)
        masks = self._rows("text_mask", "captions", rows)
        length = max(int(m.sum()) for m in masks) if masks else 1
        t = np.zeros((len(rows), length, tokens[0].shape[-1]), dtype=tokens[0].dtype)
        m = np.zeros((len(rows), length), dtype=bool)
        for i, (ti, mi) in enumerate(zip(tokens, masks)):
            n = min(length, ti.shape[0])
            t[i, :n], m[i, :n] = ti[:n], mi[:n]
        return torch.from_numpy(t), torch.from_numpy(m)

    def _need_tokens(self) -> None:
        if not self.manifest.get("cache_tokens"):
            raise ValueError(f"index {self.root} has no token cache (built with --no-cache-tokens); cannot re-rank")
