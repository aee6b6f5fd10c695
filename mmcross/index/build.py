"""Build an index: records (any reader) -> DataLoader workers (decode, transform) -> encoders -> shard writer.

Records are cut into shards of `shard_size` records in reader order; shard n always holds the same records, so a
job can be split across ranks (rank r builds shards r, r + W, ...), resumed after a kill (done shards are kept,
the others are rebuilt), or extended with `append` (records whose image_id the index already holds are skipped,
the rest go to new shards). The manifest is written when every shard is done, by rank 0 under torch.distributed,
else by whichever process finishes the last shard. The first process of a job writes it to build.json, every other
one refuses to run another job there, and each done marker records its job: an index is never built from two jobs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcross import __version__
from mmcross.config import DataCfg, ModelRef, to_dict
from mmcross.data.records import NothingReadable, Record
from mmcross.data.registry import open_dataset
from mmcross.dist import barrier, join, rank_from_env
from mmcross.encode import encode_images, encode_texts
from mmcross.index import store
from mmcross.model import Matcher
from mmcross.progress import Progress

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.float16  # the re-ranking cache is stored in half precision (half the disk; scores move ~1e-3)

# What decides a shard's records and the vectors written for them; every done marker holds it (`shard_job`), so
# shards of another job are never merged. Not the number of ranks: a job may be resumed by another number.
SHARD_KEYS = (
    "dataset",
    "data",
    "fingerprint",
    "embed_images",
    "embed_captions",
    "cache_tokens",
    "shard_size",
    "inference",
    "first_shard",
    "n_shards",
)
# What every rank of a job must be given alike: ranks started by hand cannot ask each other, build.json tells them.
RANK_KEYS = (*SHARD_KEYS, "faiss", "base_shards", "world_size")


@dataclass
class BuildOptions:
    """What `build_index` does besides where it reads and writes."""

    images: bool = True  # embed images
    captions: bool = True  # embed captions
    batch_size: int = 64  # images per encoder call (captions: 4x this)
    workers: int = 0  # DataLoader decoding processes
    cache_tokens: bool = True  # store encoder tokens for re-ranking
    shard_size: int = 1000  # records per shard
    faiss: str = "none"  # none, flat, ivf or hnsw: also build a faiss index over the vectors
    resume: bool = False  # finish an interrupted job in the same folder
    append: bool = False  # add records the index does not hold yet
    rank: int | None = None  # this process's rank; None = torchrun's $RANK, else 0
    world_size: int | None = None  # processes sharing the job; None = $WORLD_SIZE, else 1
    progress: bool = True  # show progress on stderr (a bar on a terminal, a line every ~30 s otherwise)


@dataclass
class BuildReport:
    out: str
    format: str  # the dataset reader
    shards_written: int  # by this process
    images: int  # in the whole index (0 until the manifest is written)
    captions: int
    rejects: int
    seconds: float
    images_per_s: float  # images embedded by this process per second
    complete: bool  # manifest written
    rank: int = 0  # this process
    world_size: int = 1  # processes sharing the job
    notes: list[str] = field(default_factory=list)


def _existing_ids(root: Path, shards: Sequence[int]) -> set[str]:
    ids: set[str] = set()
    for n in shards:
        ids.update(pq.read_table(store.shard_path(root, "metadata", n, "parquet"), columns=["image_id"])["image_id"])
    ids.update(
        r["image_id"]
        for n, m in store.done_shards(root).items()
        if n in shards
        for r in m["rejects"]
        if r.get("image_id")
    )
    return {str(i) for i in ids}


def _plan(root: Path, opts: BuildOptions, job: dict) -> tuple[dict, int]:
    """Validate `root` for the mode asked; returns the build record and the first shard number of this job."""
    build_path, manifest_path = root / store.BUILD, root / store.MANIFEST
    if opts.resume:
        if not build_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {root} (no {store.BUILD}); run without --resume")
        old = json.loads(build_path.read_text())
        upgraded = _relative_to_cwd(old["dataset"], job["dataset"])  # a job begun before paths were stored absolute
        if upgraded:
            old = _absolute_paths(old, job)
        keys = ("fingerprint", "embed_images", "embed_captions", "cache_tokens", "shard_size", "dataset", "data")
        for key, was, now in _differences(old, job, keys):
            hint = (
                " (a relative path: resume from the folder the job was started in)"
                if key in ("dataset", "image_root") and _is_relative(was)
                else ""
            )
            raise ValueError(f"--resume with another {key}: the job in {root} has {was!r}, not {now!r}{hint}")
        if inference_of(old) != job["inference"]:  # one index, one precision: its vectors are compared with each other
            was, now = describe_inference(inference_of(old)), describe_inference(job["inference"])
            raise ValueError(f"--resume with another precision/runtime: the job in {root} has {was}, not {now}")
        if upgraded and opts.rank == 0:
            store.atomic_write_json(build_path, old)  # stored absolute, so a later --resume works from any folder
        return old, old["first_shard"]
    if opts.append:
        manifest = store.read_manifest(root)
        store.check_index(root, manifest)
        for key in ("fingerprint", "embed_images", "embed_captions", "cache_tokens"):
            if manifest[key] != job[key]:
                raise ValueError(f"--append with another {key}: the index has {manifest[key]!r}, not {job[key]!r}")
        if inference_of(manifest) != job["inference"]:
            raise ValueError(
                f"--append with another precision/runtime: the index has {describe_inference(inference_of(manifest))}"
                f", not {describe_inference(job['inference'])}"
            )
        first = max(manifest["shards"], default=-1) + 1
        return {**job, "first_shard": first, "base_shards": manifest["shards"]}, first
    if manifest_path.exists() or (build_path.exists() and opts.world_size == 1):  # with ranks: `_claim` decides
        raise ValueError(f"{root} already holds an index; use --resume to finish it, --append to add, or another --out")
    return {**job, "first_shard": 0, "base_shards": []}, 0


def _claim(root: Path, job: dict, opts: BuildOptions) -> None:
    """Record `job` in build.json, or join the job another rank recorded there first: refused unless it is the same.

    Ranks started by hand (--rank/--world-size) start in any order and cannot ask each other what they run: the first
    one here creates build.json (exclusively: two cannot both be first), each other one compares its job to it.
    """
    path = root / store.BUILD
    if opts.append:
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old.get("first_shard") != job["first_shard"] or not old.get("n_shards"):
            store.atomic_write_json(path, job)  # the record of an earlier, finished job: this one replaces it
    elif not path.exists():
        # another rank creates build.json before anything else, so more than it (or its temporary file) is not ours;
        # rejects.jsonl alone is what a build that could read no image leaves (`build_index`): this one replaces it
        ours = (store.BUILD, f".{store.BUILD}.", store.REJECTS)
        others = [p for p in root.iterdir() if not p.name.startswith(ours)]
        if others and not path.exists():
            raise ValueError(f"{root} is not empty; give an empty or new folder")
        if store.atomic_create_json(path, job):
            return
    for key, was, now in _differences(json.loads(path.read_text()), job, RANK_KEYS):
        raise ValueError(
            f"{root} holds a job with another {key}: {was!r}, not {now!r} "
            f"(every --rank must be given the same job; another job needs another --out)"
        )


def shard_job(job: dict) -> dict:
    """What a done marker records of the job that built its shard: what decides the shard's records and vectors."""
    return {key: job.get(key) for key in SHARD_KEYS}


def _differences(old: dict, new: dict, keys: Sequence[str]) -> list[tuple[str, object, object]]:
    """(name, old value, new value) of each of `keys` that differs, a field of "data" by its own name (split,
    image_root, ...). What `old` lacks (written by an older mmcross) is not compared."""
    out = []
    for key in keys:
        if key not in old:
            continue
        if key == "data":
            was, now = old[key] or {}, new[key] or {}
            out += [(name, was[name], now.get(name)) for name in was if was[name] != now.get(name)]
        elif old[key] != new[key]:
            out.append((key, old[key], new[key]))
    return out


def build_index(
    dataset: str | Path,
    out: str | Path,
    matcher: Matcher,
    data_cfg: DataCfg | None = None,
    opts: BuildOptions | None = None,
    ref: ModelRef | None = None,
) -> BuildReport:
    """Embed a dataset's images and/or captions into an index folder (see `mmcross.index.store` for the layout).

    Args:
        dataset: anything `open_dataset` reads.
        out: the index folder.
        matcher: the model; its weights' fingerprint goes into the manifest.
        data_cfg: reader options (format, split, ...).
        opts: what to embed and how (resume, append, ranks, faiss).
        ref: how the model was named (`ModelRef`), recorded in the manifest whole so `search` rebuilds that model.

    Raises:
        ValueError: nothing to embed, an existing index without --resume/--append, a resume with other options, or
            options that do not go together.
    """
    from mmcross.factory import model_fingerprint, pinned

    opts = opts or BuildOptions()
    if not (opts.images or opts.captions):
        raise ValueError("nothing to embed: --no-images and --no-captions together")
    if opts.faiss not in ("none", "flat", "ivf", "hnsw"):
        raise ValueError(f"--faiss takes none, flat, ivf or hnsw, not {opts.faiss!r}")
    if opts.resume and opts.append:
        raise ValueError("give --resume or --append, not both")
    rank, world_size = rank_from_env(opts.rank, opts.world_size)
    join(rank, world_size)  # torchrun's group, when there is one: ranks then wait for each other at the end
    opts = dataclasses.replace(opts, rank=rank, world_size=world_size)
    start = time.perf_counter()
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file; an index is a folder (give a new or existing index folder)")
    data_cfg = data_cfg or DataCfg()
    ds = open_dataset(dataset, data_cfg)
    fingerprint = model_fingerprint(matcher)
    job = {
        "dataset": _portable(dataset),
        "data": {**to_dict(data_cfg), "image_root": data_cfg.image_root and _portable(data_cfg.image_root)},
        "fingerprint": fingerprint,
        "model": to_dict(pinned(ref or ModelRef(model=matcher.cfg.name), matcher)),
        "embed_images": opts.images,
        "embed_captions": opts.captions,
        "cache_tokens": opts.cache_tokens,
        "shard_size": opts.shard_size,
        "faiss": opts.faiss,
        "head": matcher.head_info(),  # whether `search --rerank` has a trained head to re-rank with
        "inference": to_dict(matcher.inference),  # precision and runtime of the encoders (`mmcross.fast`)
        "world_size": opts.world_size,
    }
    job = json.loads(json.dumps(job))  # as build.json holds it (tuples as lists), so jobs compare by value
    job, first_shard = _plan(root, opts, job)
    root.mkdir(parents=True, exist_ok=True)

    records = list(ds.records())
    if not records and not job["base_shards"]:
        raise ValueError(ds.nothing_in_split())
    if job["base_shards"]:
        held = _existing_ids(root, job["base_shards"])
        records = [r for r in records if r.image_id not in held]
    n_shards = -(-len(records) // opts.shard_size)
    if opts.resume and job.get("n_shards") != n_shards:
        raise ValueError(f"--resume: the dataset now gives {n_shards} shards, the job in {root} had {job['n_shards']}")
    job["n_shards"] = n_shards
    if not opts.resume:
        _claim(root, job, opts)
    all_shards = list(range(first_shard, first_shard + n_shards))
    notes: list[str] = []
    stamp = shard_job(job)
    done = _sound_shards(root, job, notes) if opts.resume else set(_own_shards(root, stamp))
    mine = [n for n in all_shards if n % opts.world_size == opts.rank and n not in done]
    images_done = _embed_shards(root, matcher, records, first_shard, mine, ds.format, data_cfg, opts, stamp)
    seconds = time.perf_counter() - start

    complete = _finish(root, job, ds.stats.rejects, opts)
    rate = images_done / max(seconds, 1e-9)
    report = BuildReport(str(root), ds.format, len(mine), 0, 0, 0, seconds, rate, complete, rank, world_size, notes)
    if complete:
        manifest = store.read_manifest(root)
        report.images, report.captions, report.rejects = manifest["images"], manifest["captions"], manifest["rejects"]
        if opts.images and report.images == 0:  # an index of nothing is not a success (exit 1)
            why = f"{report.rejects:,} reject(s): {root / store.REJECTS}"
            if not job["base_shards"]:  # a new index: gone but its rejects, so the fixed command runs in its folder
                _remove_index_files(root)
                why += "; nothing else was kept"
            raise NothingReadable(f"no image of {dataset} could be read ({why})")
    else:
        report.notes.append("other ranks still have shards to build; the last one writes the manifest")
    return report


def _remove_index_files(root: Path) -> None:
    """Remove what a build wrote in `root` (store's layout), except rejects.jsonl."""
    import shutil

    for name in store.FOLDERS:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (store.MANIFEST, store.BUILD):
        (root / name).unlink(missing_ok=True)


def inference_of(record: dict) -> dict:
    """The {"precision", "runtime"} a build record or manifest holds (torch fp32 for one written before they were
    recorded)."""
    return record.get("inference") or {"precision": "fp32", "runtime": "torch"}


def describe_inference(inference: dict) -> str:
    return f"{inference['precision']} ({inference['runtime']})"


def _portable(location: str | Path) -> str:
    """A local path made absolute, so an index names the same file whatever folder it is read from; URLs and
    `pipe:` commands as given."""
    text = str(location)
    return text if "://" in text or text.startswith("pipe:") else os.path.abspath(text)


def _is_relative(location: str | None) -> bool:
    """Whether `location` is a local path that is not absolute (as build records held them before `_portable`)."""
    return bool(location) and _portable(location) != location


def _relative_to_cwd(old: str | None, new: str | None) -> bool:
    """Whether `old` is a relative path that names `new` (an absolute one) from the current working directory."""
    return _is_relative(old) and _portable(old) == new


def _absolute_paths(old: dict, job: dict) -> dict:
    """A build record written before paths were stored absolute, with the dataset (and the image root, when it too
    names this job's from here) as this job spells them."""
    data = dict(old.get("data") or {})
    if _relative_to_cwd(data.get("image_root"), job["data"].get("image_root")):
        data["image_root"] = job["data"]["image_root"]
    return {**old, "dataset": job["dataset"], "data": data}


def _foreign(marker: dict, stamp: dict) -> list[tuple[str, object, object]]:
    """How the job that built a shard differs from `stamp` (`_differences`); empty for a marker an older mmcross
    wrote, which records no job."""
    return _differences(marker.get("job") or {}, stamp, SHARD_KEYS)


def _own_shards(root: Path, stamp: dict) -> dict[int, dict]:
    """The done markers of `root` that this job could have written (a shard of another is not done for it)."""
    return {n: m for n, m in store.done_shards(root).items() if not _foreign(m, stamp)}


def _sound_shards(root: Path, job: dict, notes: list[str]) -> set[int]:
    """The done shards of this job whose files match their done markers: a damaged shard of this job, or one another
    job built, is rebuilt (noted in `notes`); a damaged one of an earlier job (before --append) cannot be: refused."""
    sound, stamp = set(), shard_job(job)
    for n, marker in sorted(store.done_shards(root).items()):
        other = [] if n in job["base_shards"] else _foreign(marker, stamp)  # earlier jobs' shards are theirs
        problems = store.shard_problems(root, n, marker, job)
        if other:
            key, was, now = other[0]
            notes.append(f"shard {n} was built by another job ({key} {was!r}, not {now!r}): rebuilt")
        elif not problems:
            sound.add(n)
        elif n in job["base_shards"]:
            raise store.DamagedIndex(
                f"index {root} is damaged: {problems[0]}, in shard {n}, which an earlier job built (before --append); "
                f"--resume cannot rebuild it: build the index again in a new folder"
            )
        else:
            notes.append(f"shard {n} was damaged ({'; '.join(problems)}): rebuilt")
    return sound


def _records_table(records: list[Record], with_path: bool = True) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array([r.image_id for r in records], pa.string()),
            "path": pa.array([_portable(r.path) if r.path is not None else r.where for r in records], pa.string()),
            "split": pa.array([r.split for r in records], pa.string()),
            "caption": pa.array([r.captions[0] if r.captions else None for r in records], pa.string()),
        }
    )


def _embed_texts(matcher: Matcher, records: list[Record], opts: BuildOptions):
    rows = [(r.image_id, c, i) for r in records for i, c in enumerate(r.captions)]
    meta = pa.table(
        {
            "image_id": pa.array([x[0] for x in rows], pa.string()),
            "caption": pa.array([x[1] for x in rows], pa.string()),
            "caption_index": pa.array([x[2] for x in rows], pa.int32()),
        }
    )
    captions = [x[1] for x in rows]
    if not captions:
        return meta, np.zeros((0, matcher.image_encoder.embed_dim), np.float32), None, None
    features = encode_texts(matcher, captions, batch_size=opts.batch_size * 4, tokens=opts.cache_tokens)
    pooled = features.pooled.numpy().astype(np.float32)
    if not opts.cache_tokens:
        return meta, pooled, None, None
    return meta, pooled, features.tokens.numpy().astype(TOKEN_DTYPE), features.mask.numpy().astype(bool)


def _embed_shards(
    root: Path,
    matcher: Matcher,
    records: list[Record],
    first_shard: int,
    shards: list[int],
    fmt: str,
    data_cfg: DataCfg,
    opts: BuildOptions,
    stamp: dict,
) -> int:
    """Embed and write `shards`, their markers stamped with `stamp` (`shard_job`); returns the images embedded."""
    if not shards:
        return 0
    S = opts.shard_size
    spans = {n: (n - first_shard) * S for n in shards}
    todo = [(n, i) for n in shards for i in range(spans[n], min(spans[n] + S, len(records)))]
    images_done = 0
    bar = Progress(len(todo), "embedding", "images" if opts.images else "records", enabled=opts.progress)
    if not opts.images:
        for n in shards:
            chunk = records[spans[n] : spans[n] + S]
            shard = store.Shard(n, _records_table(chunk), None, job=stamp)
            shard.text_metadata, shard.text_emb, shard.text_tokens, shard.text_mask = _embed_texts(matcher, chunk, opts)
            store.write_shard(root, shard)
            bar.advance(len(chunk))
        bar.close()
        return 0

    flat = [records[i] for _, i in todo]
    owner = [n for n, _ in todo]
    # a batch never spans two shards, so a shard's vectors do not depend on which shards one run builds (a resume,
    # another rank): int8 graphs quantise activations per batch
    starts = [k for k in range(len(todo)) if k == 0 or owner[k] != owner[k - 1]] + [len(todo)]
    per_shard = [range(a, b) for a, b in zip(starts, starts[1:])]
    calls = [list(span[i : i + opts.batch_size]) for span in per_shard for i in range(0, len(span), opts.batch_size)]
    batches = encode_images(
        matcher, flat, workers=opts.workers, cfg=data_cfg, tokens=opts.cache_tokens, draft=True, batches=calls
    )
    pending: dict[int, dict] = {n: {"left": min(S, len(records) - spans[n]), "rows": [], "rejects": []} for n in shards}
    for batch in batches:
        if batch.features is not None:
            pooled = batch.features.pooled.cpu().numpy()
            tokens = batch.features.tokens.cpu().numpy().astype(TOKEN_DTYPE) if opts.cache_tokens else None
            for j, (pos, record) in enumerate(zip(batch.indices, batch.records)):
                p = pending[owner[pos]]
                p["rows"].append((pos, record, pooled[j], None if tokens is None else tokens[j]))
                p["left"] -= 1
            images_done += len(batch.indices)
        for pos, reject in batch.rejects:
            p = pending[owner[pos]]
            p["rejects"].append((pos, {**asdict(reject), "shard": owner[pos]}))
            p["left"] -= 1
        bar.advance(len(batch.indices) + len(batch.rejects))
        for n in [n for n, p in pending.items() if p["left"] == 0]:
            _write_image_shard(root, matcher, n, records[spans[n] : spans[n] + S], pending.pop(n), opts, stamp)
    bar.close()
    return images_done


def _write_image_shard(
    root: Path, matcher: Matcher, n: int, chunk: list[Record], p: dict, opts: BuildOptions, stamp: dict
) -> None:
    rows = sorted(p["rows"], key=lambda x: x[0])
    e = matcher.image_encoder.embed_dim
    shard = store.Shard(n, _records_table([r[1] for r in rows]), None, job=stamp)
    shard.img_emb = np.stack([r[2] for r in rows]).astype(np.float32) if rows else np.zeros((0, e), np.float32)
    if opts.cache_tokens and rows:
        shard.img_tokens = np.stack([r[3] for r in rows])
    shard.rejects = [{k: v for k, v in r.items() if v is not None} for _, r in sorted(p["rejects"], key=lambda x: x[0])]
    if opts.captions:
        shard.text_metadata, shard.text_emb, shard.text_tokens, shard.text_mask = _embed_texts(matcher, chunk, opts)
    store.write_shard(root, shard)


def _finish(root: Path, job: dict, reader_rejects: list, opts: BuildOptions) -> bool:
    """Write the manifest (and faiss indexes, rejects.jsonl) once every shard of the job is done."""
    synced = barrier()
    if synced and opts.rank != 0:
        return (root / store.MANIFEST).is_file()
    markers = store.done_shards(root)
    n_records_shards = _expected_shards(root, job, opts)
    for n in n_records_shards:  # a rank of another job that raced this one to build.json: never merged
        for key, was, now in _foreign(markers.get(n, {}), shard_job(job))[:1]:
            raise ValueError(
                f"shard {n} in {root} was built by another job ({key} {was!r}, not {now!r} as in {store.BUILD}); "
                f"rebuild it with --resume and the job's options"
            )
    if not all(n in markers for n in n_records_shards):
        return False
    shards = sorted(set(job["base_shards"]) | set(n_records_shards))
    counts = {
        str(n): {"images": markers[n]["images"], "captions": markers[n]["captions"], "records": markers[n]["records"]}
        for n in shards
    }
    rejects = [r.to_json() for r in reader_rejects] if not job["base_shards"] else []
    old_rejects = root / store.REJECTS
    lines = old_rejects.read_text().splitlines() if job["base_shards"] and old_rejects.is_file() else []
    lines += rejects + [json.dumps(r, ensure_ascii=False) for n in n_records_shards for r in markers[n]["rejects"]]
    store.atomic_write_bytes(old_rejects, ("\n".join(lines) + "\n" if lines else "").encode())
    dims = {}
    for kind in ("img_emb", "text_emb"):
        for n in shards:
            path = store.shard_path(root, kind, n, "npy")
            if path.is_file():
                dims[kind] = int(np.load(path, mmap_mode="r").shape[1])
                break
    manifest = {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "mmcross_version": __version__,
        "model": job["model"],
        "fingerprint": job["fingerprint"],
        "head": job.get("head"),  # {"trained", "steps"} of the fusion head; None: a job begun before it was kept
        "inference": inference_of(job),  # {"precision", "runtime"} the encoders ran with
        "dataset": job["dataset"],
        "data": job["data"],
        "images": sum(c["images"] for c in counts.values()),
        "captions": sum(c["captions"] for c in counts.values()),
        "rejects": len(lines),
        "dim": dims.get("img_emb", dims.get("text_emb")),
        "dtype": "float32",
        "token_dtype": np.dtype(TOKEN_DTYPE).name if job["cache_tokens"] else None,
        "cache_tokens": job["cache_tokens"],
        "shard_size": job["shard_size"],
        "embed_images": job["embed_images"],
        "embed_captions": job["embed_captions"],
        "shards": shards,
        "shard_counts": counts,
        "faiss": {},
    }
    if job.get("faiss", "none") != "none":
        from mmcross.index.search import build_faiss_files

        manifest["faiss"] = build_faiss_files(root, shards, job["faiss"])
    store.atomic_write_json(root / store.MANIFEST, manifest)
    return True


def _expected_shards(root: Path, job: dict, opts: BuildOptions) -> list[int]:
    """Shard numbers this job covers (its records, cut by shard size), from the count in build.json."""
    return list(range(job["first_shard"], job["first_shard"] + job.get("n_shards", 0)))
