"""Records -> batches of pixel tensors for `index` and `train`: decode and transform in DataLoader workers.

A worker never crashes on a bad file: an image that cannot be decoded or transformed comes back as a `Reject`, and
the batch carries it beside the good images. Usage::

    log = RejectLog(out_dir)                           # mmcross.data.records: OUT/rejects.jsonl
    loader = image_loader(records, encoders.image.preprocess, batch_size=64, workers=2)
    for batch in loader:
        if batch.pixels is not None:                   # None when every image of the batch was rejected
            features = model(batch.pixels)             # (B, 3, H, W)
            keep(batch.indices, batch.records)         # positions in `records`, and the records (bytes dropped)
        log.write(batch.rejects)                       # (position, Reject(path, reason, image_id))

`records` is a sequence (read with random access, shuffling allowed) or a zero-argument function returning a fresh
iterable (streamed, e.g. webdataset shards: worker k keeps items k, k + W, k + 2W, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcross.config import DataCfg
from mmcross.data.images import try_decode
from mmcross.data.records import Record, Reject

Transform = Callable[[Image.Image], torch.Tensor]  # an RGB PIL image -> (3, H, W), e.g. open_clip's preprocess


@dataclass
class LoadedBatch:
    """One batch: the images that loaded, stacked, and the rejects, each with its position in the input."""

    indices: list[int]  # position in the input of each image in `pixels`
    records: list[Record]  # the records of `pixels`, in the same order, with `data` (encoded bytes) dropped
    pixels: torch.Tensor | None  # (B, 3, H, W) transformed images; None when the whole batch was rejected
    rejects: list[tuple[int, Reject]]  # (position in the input, why the image could not be used)


def load_item(index: int, record: Record, transform: Transform, cfg: DataCfg, draft_size=None):
    """(index, record without bytes, pixel tensor or Reject): decode and transform one record; never raises."""
    source = record.data if record.data is not None else record.path
    light = dataclasses.replace(record, data=None)
    if source is None:
        return index, light, Reject(record.where, "record has neither a path nor bytes", image_id=record.image_id)
    decoded = try_decode(
        source,
        record.where,
        record.image_id,
        max_pixels=cfg.max_image_pixels,
        background=tuple(cfg.background),
        draft_size=draft_size,
    )
    if isinstance(decoded, Reject):
        return index, light, decoded
    try:
        return index, light, transform(decoded.image)
    except Exception as err:  # noqa: BLE001 - a transform failing on one image must not kill the worker
        return index, light, Reject(record.where, f"transform failed: {type(err).__name__}: {err}", record.image_id)


class RecordImages(torch.utils.data.Dataset):
    """Map-style dataset over a sequence of records: item i is (i, record, pixels or Reject)."""

    def __init__(self, records: Sequence[Record], transform: Transform, cfg: DataCfg | None = None, draft_size=None):
        self.records, self.transform, self.cfg, self.draft_size = records, transform, cfg or DataCfg(), draft_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return load_item(index, self.records[index], self.transform, self.cfg, self.draft_size)


class StreamedImages(IterableDataset):
    """Iterable dataset over a record stream; with W workers, worker k decodes items k, k + W, ..."""

    def __init__(
        self,
        make_records: Callable[[], Iterable[Record]],
        transform: Transform,
        cfg: DataCfg | None = None,
        draft_size=None,
    ):
        self.make_records, self.transform = make_records, transform
        self.cfg, self.draft_size = cfg or DataCfg(), draft_size

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, record in enumerate(self.make_records()):
            if index % workers == worker:
                yield load_item(index, record, self.transform, self.cfg, self.draft_size)


def collate(items: list[tuple]) -> LoadedBatch:
    """Stack the loaded images of a batch and set the rejects aside."""
    good = [(i, r, x) for i, r, x in items if not isinstance(x, Reject)]
    return LoadedBatch(
        indices=[i for i, _, _ in good],
        records=[r for _, r, _ in good],
        pixels=torch.stack([x for _, _, x in good]) if good else None,
        rejects=[(i, x) for i, _, x in items if isinstance(x, Reject)],
    )


def image_loader(
    records: Sequence[Record] | Callable[[], Iterable[Record]],
    transform: Transform,
    *,
    batch_size: int = 64,
    workers: int = 0,
    cfg: DataCfg | None = None,
    draft_size: tuple[int, int] | None = None,
    shuffle: bool = False,
    batches: Sequence[Sequence[int]] | None = None,
    **loader_kwargs,
) -> DataLoader:
    """A DataLoader of `LoadedBatch`es; decoding and `transform` run in `workers` processes.

    Args:
        records: a sequence of records, or a function returning a fresh iterable of them (streamed).
        transform: RGB PIL image -> (3, H, W) tensor.
        batch_size: records per batch (rejected ones included, so a batch may hold fewer images).
        workers: DataLoader worker processes; 0 decodes in this process.
        cfg: image options (pixel limit, background); defaults to `DataCfg()`.
        draft_size: (width, height) hint for reduced-scale JPEG decoding, e.g. the model's input size.
        shuffle: shuffle a sequence each epoch (streams are read in order).
        batches: the positions of each batch, in order, instead of `batch_size` and `shuffle` (a sequence only).
        **loader_kwargs: passed to `torch.utils.data.DataLoader` (pin_memory, persistent_workers, ...).
    """
    if callable(records) and not isinstance(records, Sequence):
        dataset = StreamedImages(records, transform, cfg, draft_size)
        shuffle = False
    else:
        dataset = RecordImages(records, transform, cfg, draft_size)
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, **loader_kwargs)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate, **loader_kwargs
    )
