"""Decode once: every training image at the training scale in one memory-mapped uint8 array, and tensor augmentation.

Training from scratch on a few thousand photos runs tens of epochs over the same JPEGs; decoding and resizing them
again every step costs a core. `DecodedImages.open_or_build` decodes each image once (shorter side resized to
`size`, centre square cut, as the evaluation transform does at that scale) into

    CACHE/<key>/pixels.u8     (N, size, size, 3) uint8, row i = records[i] (zeros where the image was rejected)
    CACHE/<key>/meta.json     shape, which rows decoded, the reject records, what the key was made of

where `key` is a hash of the dataset, split, size and a fingerprint of the file list (path, byte size and
modification time of every image; the bytes themselves for images read from shards). A later epoch or a later run
with the same key maps the file instead of decoding; anything else (another size, an edited file list) gets its own
folder. The array and `meta.json` are written under temporary names of the building process (`.tmp<PID>`) and
`meta.json` is renamed last, so a killed build is simply rebuilt, and the next build removes the killed one's
temporary files; a damaged cache (a `meta.json` that does not parse, a pixel file of the wrong size) is rebuilt too.

`augment_batch` then does on tensors what open_clip's training transform does on PIL images: a random resized crop
(area share in [`min_scale`, 1], aspect ratio in [3/4, 4/3]) to the model's input size, bilinear with area sampling
(`torchvision.ops.roi_align`, one call for the whole batch), and the model's normalisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcross.config import DataCfg
from mmcross.data.records import Record, Reject

log = logging.getLogger(__name__)

CACHE_VERSION = 1
PIXELS, META = "pixels.u8", "meta.json"


def default_cache_dir() -> Path:
    """`$MMCROSS_CACHE/decoded`, else `~/.cache/mmcross/decoded`."""
    root = os.environ.get("MMCROSS_CACHE") or Path.home() / ".cache" / "mmcross"
    return Path(root) / "decoded"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (on another system than POSIX: assumed, so nothing is deleted)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or no PID at all: leave it)
    return True


def remove_dead_builds(cache_dir: str | Path) -> None:
    """Delete the temporary files of builds in `cache_dir` whose process is gone (killed mid-build): nothing else
    ever would, and a build's pixel file is the whole array (~400 MB for Flickr8k). PIDs are this machine's: builds
    on other machines into one shared folder at the same moment would lose their files."""
    for pattern in (f"*/{PIXELS}.tmp*", f"*/{META}.tmp*"):
        for path in Path(cache_dir).glob(pattern):
            pid = path.name.rpartition(".tmp")[2]
            if pid.isdigit() and not _alive(int(pid)):  # a live build's file (this one's included) stays
                log.info("removing %s, left by a killed build", path)
                path.unlink(missing_ok=True)


def file_list_fingerprint(records: Sequence[Record]) -> str:
    """A hash of which images, in which order, in which version (path, size, mtime; bytes for shard records)."""
    h = hashlib.sha256()
    for record in records:
        h.update(record.where.encode("utf-8", "surrogateescape") + b"\0")
        if record.data is not None:
            h.update(hashlib.sha256(record.data).digest())
        elif record.path is not None:
            try:
                st = os.stat(record.path)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


class _SquareAt:
    """PIL image -> (size, size, 3) uint8 tensor: shorter side to `size` (bicubic), centre square (eval geometry)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.center_crop(TF.resize(image, self.size, InterpolationMode.BICUBIC), [self.size, self.size])
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (S, S, 3)


@dataclass
class DecodedImages:
    """The decoded training images: `pixels[i]` is records[i] at `size` x `size` where `ok[i]`."""

    pixels: np.ndarray  # (N, S, S, 3) uint8, memory-mapped read-only
    ok: np.ndarray  # (N,) bool: the image decoded
    rejects: list[Reject]  # why the others did not
    folder: Path
    built: bool  # decoded in this call (False: read from an earlier run)

    @staticmethod
    def nbytes(n_images: int, size: int) -> int:
        return n_images * size * size * 3

    @classmethod
    def open_or_build(
        cls,
        records: Sequence[Record],
        size: int,
        cache_dir: str | Path,
        *,
        dataset: str = "",
        split: str | None = None,
        cfg: DataCfg | None = None,
        workers: int = 0,
        batch_size: int = 64,
    ) -> DecodedImages:
        """Map the cache for (dataset, split, size, file list), decoding it first when it is not there."""
        ident = {
            "version": CACHE_VERSION,
            "dataset": str(Path(dataset).resolve()) if dataset else "",
            "split": split,
            "size": size,
            "files": file_list_fingerprint(records),
            "n": len(records),
        }
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache_dir) / key
        meta_path = folder / META
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("ident") == ident:
                    return cls._open(folder, meta, built=False)
                why = "does not match its key"
            except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:  # damaged: decode again
                why = f"cannot be read ({type(exc).__name__}: {exc})"
            log.warning("decoded-image cache %s %s; rebuilding it", folder, why)
        remove_dead_builds(cache_dir)
        cls._build(records, size, folder, ident, cfg or DataCfg(), workers, batch_size)
        remove_dead_builds(cache_dir)  # and those killed while this one ran
        return cls._open(folder, json.loads(meta_path.read_text()), built=True)

    @classmethod
    def _open(cls, folder: Path, meta: dict, built: bool) -> DecodedImages:
        shape = tuple(meta["shape"])
        # before mapping: a short file is a cryptic mmap error, a long one is not the array meta.json describes
        found, expected = (folder / PIXELS).stat().st_size, math.prod(shape)
        if found != expected:
            raise ValueError(f"{PIXELS} holds {found} bytes, {shape} needs {expected}")
        pixels = np.memmap(folder / PIXELS, dtype=np.uint8, mode="r", shape=shape)
        ok = np.zeros(shape[0], dtype=bool)
        ok[meta["ok"]] = True
        rejects = [Reject(**r) for r in meta["rejects"]]
        return cls(pixels, ok, rejects, folder, built)

    @staticmethod
    def _build(
        records: Sequence[Record], size: int, folder: Path, ident: dict, cfg: DataCfg, workers: int, batch_size: int
    ) -> None:
        from mmcross.data.loader import image_loader

        folder.mkdir(parents=True, exist_ok=True)
        shape = (len(records), size, size, 3)
        tmp = folder / (PIXELS + f".tmp{os.getpid()}")
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)  # a raw file; meta.json holds the shape
        ok: list[int] = []
        rejects: list[Reject] = []
        # JPEGs decode at the smallest DCT scale that is still >= size (draft mode): 224 px photos at 112 px cost half
        loader = image_loader(
            records, _SquareAt(size), batch_size=batch_size, workers=workers, cfg=cfg, draft_size=(size, size)
        )
        for batch in loader:
            if batch.pixels is not None:
                array[batch.indices] = batch.pixels.numpy()
                ok.extend(batch.indices)
            rejects.extend(reject for _, reject in batch.rejects)
        array.flush()
        del array
        meta = {"ident": ident, "shape": list(shape), "ok": sorted(ok), "rejects": [vars(r) for r in rejects]}
        tmp_meta = folder / (META + f".tmp{os.getpid()}")  # per build: a concurrent one's rename cannot take it
        tmp_meta.write_text(json.dumps(meta))
        try:
            tmp.replace(folder / PIXELS)
            tmp_meta.replace(folder / META)
        except FileNotFoundError:
            if not (folder / META).is_file():
                raise
            # a concurrent build of this key finished first (and took a file of ours for a dead build's): its cache
            # is the same pixels, and open_or_build checks it
            log.info("another build completed %s first; using it", folder)
            tmp.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)

    def batch(self, index: Sequence[int]) -> torch.Tensor:
        """(B, S, S, 3) uint8 rows `index` (a copy, so the map stays read-only)."""
        return torch.from_numpy(np.ascontiguousarray(self.pixels[np.asarray(index, dtype=np.int64)]))


def augment_batch(
    images: torch.Tensor,
    out_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    min_scale: float | None,
    hflip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, H, W) normalised float: a random resized crop of each image, or (`min_scale`
    None) the whole image resized, which is the evaluation transform at the cache's scale.

    The crop draws the area share from U(min_scale, 1) and the log aspect ratio from U(log 3/4, log 4/3), as
    torchvision's `RandomResizedCrop` does (falling back to the whole image when a draw does not fit); `hflip` then
    mirrors each crop left-right with probability 1/2 (drawn after the crops, so the crops do not change)."""
    from torchvision.ops import roi_align

    b, s = images.shape[0], images.shape[1]
    x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
    h, w = out_size
    if min_scale is None:
        boxes = torch.tensor([[0.0, 0.0, s, s]]).repeat(b, 1)  # (B, 4) x0, y0, x1, y1
    else:
        u = torch.rand(b, 4, generator=generator)  # (B, 4)
        area = s * s * (min_scale + (1 - min_scale) * u[:, 0])
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # (B,)
        fits = (cw <= s) & (ch <= s)
        cw, ch = torch.where(fits, cw, float(s)), torch.where(fits, ch, float(s))
        x0, y0 = (s - cw) * u[:, 2], (s - ch) * u[:, 3]
        boxes = torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)  # (B, 4)
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes], dim=1)  # (B, 5) batch index + box
    # sampling_ratio 0: as many samples per output cell as the box has pixels there (an area average, no aliasing)
    out = roi_align(x, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=0, aligned=True)  # (B, 3, H, W)
    if hflip:
        mirror = torch.rand(b, generator=generator) < 0.5  # (B,)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    mean_t = torch.tensor(mean, dtype=out.dtype)[None, :, None, None]
    std_t = torch.tensor(std, dtype=out.dtype)[None, :, None, None]
    return (out - mean_t) / std_t
