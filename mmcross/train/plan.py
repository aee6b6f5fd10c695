"""The batch plan: which images and captions each micro-batch holds, and where its pixels come from.

Micro-batch m is a fixed function of (seed, m, rank) (`EpochPlan`; on the feature cache optionally `NeighbourPlan`,
batches of look-alike images), so a resumed run takes exactly the batches the uninterrupted run would have. The
pixels come from one of three sources (`BatchSource`): the feature cache (frozen encoders: encoder outputs computed
once), the decoded-image cache (uint8 arrays decoded once, crops on tensors), or image files decoded at every step
in DataLoader workers (a training set too large for the cache).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcross.config import DataCfg, TrainCfg, train_data_cfg
from mmcross.data.decoded import DecodedImages, augment_batch, default_cache_dir
from mmcross.data.loader import collate, load_item
from mmcross.data.records import NothingReadable, Record, Reject, caption_key
from mmcross.data.word_drop import drop_words
from mmcross.dist import barrier
from mmcross.encode import encode_records, encode_texts
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.model import Matcher

log = logging.getLogger(__name__)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class KeyedDraws:
    """Random tensors that are a fixed function of (seed, key): `make(generator seeded by mix_seed(seed, *key))`,
    each kind (`what`) kept for its latest key, so an epoch's permutation is drawn once, not per micro-batch."""

    def __init__(self, seed: int):
        self.seed = seed
        self._latest: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def __call__(self, what: str, key: tuple[int, ...], make) -> torch.Tensor:
        latest = self._latest.get(what)
        if latest is None or latest[0] != key:
            latest = self._latest[what] = (key, make(torch.Generator().manual_seed(mix_seed(self.seed, *key))))
        return latest[1]


class EpochPlan:
    """Which images and captions micro-batch m holds: a fixed function of (seed, epoch, position), so resumable.

    A micro-batch is `batch` (image, caption) rows: `batch / C` distinct images, each with C of its captions in
    consecutive rows (C = `captions_per_image`). An epoch shows every caption of every image once: it is
    ceil(R / C) rounds (R = the most captions any image has), each a fresh permutation of the images, and in round r
    image i carries its captions (o_i + r C + c) mod n_i, c = 0..C-1, o_i a random offset drawn per epoch. An image
    with fewer captions than R repeats some of them. A round drops the last `n_images mod global batch` images of
    its permutation. The losses treat rows of the same image as known matches, never as negatives.

    Args:
        n_images: images in the training set.
        caption_counts: captions per image.
        batch: rows (image, caption pairs) per micro-batch per rank; a multiple of `captions_per_image`.
        world_size: ranks; a global micro-batch holds `batch * world_size / C` distinct images.
        seed: the run's seed.
        captions_per_image: C; above 1, the image tower runs once for C captions (`MicroBatch.image_rows`).
    """

    def __init__(
        self,
        n_images: int,
        caption_counts: Sequence[int],
        batch: int,
        world_size: int,
        seed: int,
        captions_per_image: int = 1,
    ):
        if captions_per_image < 1 or batch % captions_per_image:
            raise ValueError(
                f"train.batch_size ({batch}) must be a multiple of train.captions_per_image ({captions_per_image})"
            )
        self.n, self.batch, self.world_size, self.seed = n_images, batch, world_size, seed
        self.per_image = captions_per_image
        self.images_per_batch = batch // captions_per_image
        self.counts = torch.tensor(list(caption_counts)).clamp_min(1)
        self.rounds = math.ceil(int(self.counts.max()) / captions_per_image) if n_images else 1
        self.per_round = n_images // (self.images_per_batch * world_size)
        if self.per_round < 1:
            raise ValueError(
                f"{n_images} training images are fewer than one global batch ({self.images_per_batch * world_size})"
            )
        self.per_epoch = self.rounds * self.per_round
        self._draw = KeyedDraws(seed)

    def micro_batch(self, m: int, rank: int) -> tuple[int, list[int], list[int]]:
        """(epoch, image index per row, caption index per row) of global micro-batch `m` for `rank`."""
        epoch, within = divmod(m, self.per_epoch)
        round_, position = divmod(within, self.per_round)
        offset = self._draw("offset", (epoch, 1), lambda g: torch.randint(0, 1 << 30, (self.n,), generator=g))
        perm = self._draw("perm", (epoch, round_, 5), lambda g: torch.randperm(self.n, generator=g))
        per_rank = self.images_per_batch
        start = position * per_rank * self.world_size + rank * per_rank
        images = perm[start : start + per_rank]  # (I,)
        first = offset[images] + round_ * self.per_image  # (I,)
        captions = (first[:, None] + torch.arange(self.per_image)) % self.counts[images][:, None]  # (I, C)
        return epoch, images.repeat_interleave(self.per_image).tolist(), captions.flatten().tolist()


NEIGHBOUR_POOL = 16  # a neighbourhood's images are drawn from the seed's this many nearest


def nearest_images(
    pooled: torch.Tensor, good: torch.Tensor, k: int = NEIGHBOUR_POOL, chunk: int = 2048
) -> torch.Tensor:
    """(N, k) indices of each image's k nearest other images by cosine of `pooled` (N, E); images not `good`
    (unreadable) are never anyone's neighbour."""
    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    k = min(k, max(int(good.sum()) - 1, 1))
    nearest = []
    for start in range(0, len(unit), chunk):
        sim = unit[start : start + chunk] @ unit.T  # (c, N)
        sim[:, ~good.to(sim.device)] = -float("inf")
        rows = torch.arange(start, start + len(sim), device=sim.device)
        sim[torch.arange(len(sim), device=sim.device), rows] = -float("inf")  # never itself
        nearest.append(sim.topk(k, dim=1).indices.cpu())
    return torch.cat(nearest)


class NeighbourPlan:
    """Micro-batches of neighbourhoods (`train.neighbour_batches` = G; feature cache): each epoch every image is
    drawn once as a seed, in a fresh permutation, and brings G images drawn from its `NEIGHBOUR_POOL` nearest (one
    random caption per row). The ITM draws its negatives within the batch, so they are then the look-alikes that
    the dual encoder's top candidates are at search time rather than whatever shared a random batch. A fixed
    function of (seed, m, rank) like `EpochPlan`, so resumable. Rows of one image (a neighbour met twice) are known
    matches of each other, never negatives.

    Args:
        nearest: (N, k) each image's nearest images (`nearest_images`).
        caption_counts: captions per image.
        batch: rows per micro-batch per rank, a multiple of G + 1.
        world_size, seed: as `EpochPlan`.
        group: G.
    """

    def __init__(
        self, nearest: torch.Tensor, caption_counts: Sequence[int], batch: int, world_size: int, seed: int, group: int
    ):
        if batch % (group + 1):
            raise ValueError(f"a batch of {batch} rows does not split into neighbourhoods of {group + 1} images")
        self.nearest, self.batch, self.world_size, self.seed, self.group = nearest, batch, world_size, seed, group
        self.n = len(nearest)
        self.counts = torch.tensor(list(caption_counts)).clamp_min(1)
        self.seeds_per_batch = batch // (group + 1)
        self.per_epoch = self.n // (self.seeds_per_batch * world_size)
        if self.per_epoch < 1:
            raise ValueError(f"{self.n} training images are fewer than one global batch's seeds")
        self._draw = KeyedDraws(seed)

    def micro_batch(self, m: int, rank: int) -> tuple[int, list[int], list[int]]:
        """(epoch, image index per row, caption index per row) of global micro-batch `m` for `rank`."""
        epoch, position = divmod(m, self.per_epoch)
        perm = self._draw("perm", (epoch, 8), lambda g: torch.randperm(self.n, generator=g))
        s = self.seeds_per_batch
        start = (position * self.world_size + rank) * s
        seeds = perm[start : start + s]  # (S,)
        g = torch.Generator().manual_seed(mix_seed(self.seed, m, rank, 9))
        pick = torch.rand(s, self.nearest.shape[1], generator=g).argsort(dim=1)[:, : self.group]  # (S, G)
        members = torch.cat([seeds[:, None], self.nearest[seeds[:, None], pick]], dim=1).flatten()  # (S (G + 1),)
        captions = (torch.rand(len(members), generator=g) * self.counts[members]).long()
        return epoch, members.tolist(), captions.tolist()


def distinct_images(images: Sequence[int]) -> tuple[list[int], torch.Tensor | None]:
    """(each distinct image once, in row order; which of them each row is), or (images, None) when all differ."""
    distinct = list(dict.fromkeys(images))
    if len(distinct) == len(images):
        return list(images), None
    where = {image: k for k, image in enumerate(distinct)}
    return distinct, torch.tensor([where[image] for image in images])


class PlannedImages(torch.utils.data.Dataset):
    """Micro-batches `first, first + 1, ...` of an `EpochPlan` for one rank, decoded (in DataLoader workers)."""

    def __init__(
        self,
        records: Sequence[Record],
        plan: EpochPlan,
        first: int,
        count: int,
        rank: int,
        transform,
        cfg: DataCfg,
        draft_size: tuple[int, int] | None = None,
    ):
        self.records, self.plan, self.first, self.count, self.rank = records, plan, first, count, rank
        self.transform, self.cfg = transform, cfg
        self.draft_size = draft_size  # (W, H): JPEGs decode at the smallest DCT scale at least this large

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int):
        epoch, images, captions = self.plan.micro_batch(self.first + b, self.rank)
        items = []
        for image in dict.fromkeys(images):  # each distinct image once, in row order
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.plan.seed, epoch, image, 2))  # augmentation of this image this epoch
                items.append(load_item(image, self.records[image], self.transform, self.cfg, self.draft_size))
        return collate(items), list(zip(images, captions))


def known_matches(
    records: Sequence[Record], captions: Sequence[str], also_true: dict[str, list[str]] | None = None
) -> torch.Tensor:
    """(B, B) bool: caption j (the one drawn for image j) is also true of image i: image j is image i (the same file
    under two records), the caption is one of image i's own captions, or one of the other captions
    `also_true[image_id]` lists as true of image i (a synth manifest's `statements`).

    Captions compare by `caption_key` (case, spacing, final period ignored). Such pairs are no negatives in the losses.
    """
    also_true = also_true or {}
    own = [{caption_key(c) for c in [*record.captions, *also_true.get(record.image_id, ())]} for record in records]
    drawn = [caption_key(c) for c in captions]
    where = [record.where for record in records]
    return torch.tensor(
        [[caption in mine or where[j] == where[i] for j, caption in enumerate(drawn)] for i, mine in enumerate(own)],
        dtype=torch.bool,
    )


def paraphrase_cosines(
    unit_texts: torch.Tensor, first_caption: torch.Tensor, counts: torch.Tensor, cap: torch.Tensor
) -> torch.Tensor:
    """(B, B): the cosine of caption `cap[j]` to the nearest of row i's own captions.

    Args:
        unit_texts: (N_cap, E) unit caption embeddings of the feature cache.
        first_caption: (B,) index in `unit_texts` of each row's image's first caption.
        counts: (B,) how many captions each row's image has.
        cap: (B,) index in `unit_texts` of the caption drawn for each row.
    """
    k = torch.arange(int(counts.max()))
    own = first_caption[:, None] + torch.minimum(k[None, :], counts[:, None] - 1)  # (B, K), padded by repeats
    return torch.einsum("bke,je->bkj", unit_texts[own], unit_texts[cap]).amax(dim=1)  # (B, B)


def paraphrase_matches(
    unit_texts: torch.Tensor, first_caption: torch.Tensor, counts: torch.Tensor, cap: torch.Tensor, threshold: float
) -> torch.Tensor:
    """(B, B) bool: caption `cap[j]` is within `threshold` cosine of one of row i's own captions (a paraphrase);
    arguments as `paraphrase_cosines`."""
    return paraphrase_cosines(unit_texts, first_caption, counts, cap) >= threshold


def paraphrase_threshold(
    cache: FeatureCache,
    unit_texts: torch.Tensor,
    counts: torch.Tensor,
    plan,
    share: float,
    known_of: Callable[[list[int], list[int]], torch.Tensor],
    batches: int = 32,
) -> float:
    """The cosine above which `share` of the (image, another image's drawn caption) pairs lie in the first
    `batches` micro-batches of `plan` (rank 0's: every rank computes the same value), so the paraphrase mask marks
    about that share of the pairs training meets, whatever the text tower's cosines look like.

    Args:
        counts: (N,) captions of each training image.
        known_of: (images, drawn caption indices) -> (B, B) bool of the pairs already known to match (repeated
            captions, the same image file): left out, since the mask adds nothing there (repeats, at cosine 1, would
            otherwise take the share and leave the mask empty).
    """
    found = []
    for m in range(batches):
        _, images, captions = plan.micro_batch(m, 0)
        keep = [k for k, i in enumerate(images) if cache.good[i]]
        idx = torch.tensor([images[k] for k in keep], dtype=torch.long)
        cap = cache.first_caption[idx] + torch.tensor([captions[k] for k in keep], dtype=torch.long)
        cosine = paraphrase_cosines(unit_texts, cache.first_caption[idx], counts[idx], cap)
        found.append(cosine[~known_of(idx.tolist(), cap.tolist())])
    pool = torch.cat(found)
    return float(np.quantile(pool.numpy(), 1.0 - share)) if len(pool) else 1.0


def dataset_pairs(matcher: Matcher, records: Sequence[Record], captions: Sequence[str], negative_of):
    """Every caption of each image that has a swapped negative, and that negative, as labelled ITM pairs: the
    binding signal, which the one drawn caption per image would give a third as often (one encoded image, 2n pairs).
    """
    labelled = [
        (row, text, label)
        for row, (r, drawn) in enumerate(zip(records, captions))
        for caption, negative in negative_of.get(r.image_id, {}).items()
        for text, label in ((caption, 1.0), (negative, 0.0))
        if text != drawn  # the drawn caption is already the ITM's positive
    ]
    if not labelled:
        return None
    rows, texts, labels = zip(*labelled)
    return torch.tensor(rows), matcher.tokenize(list(texts)), torch.tensor(labels)


def normalisation(transform) -> tuple[list[float], list[float]]:
    """(mean, std) of the `Normalize` step of an image transform (open_clip's preprocess)."""
    from torchvision.transforms import Normalize

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, Normalize):
            return list(step.mean), list(step.std)
    raise ValueError("the image transform has no Normalize step")


def streaming_transform(matcher: Matcher, cfg: TrainCfg):
    """The PIL transform of the streaming path: open_clip's training transform with `augment_min_scale` (and a
    left-right mirror with `augment_hflip`)."""
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop

    encoder = matcher.image_encoder
    if not cfg.augment or encoder.preprocess_train is None:
        return encoder.preprocess
    steps = list(getattr(encoder.preprocess_train, "transforms", []))
    if steps and isinstance(steps[0], RandomResizedCrop):
        first = steps[0]
        steps[0] = RandomResizedCrop(
            first.size, scale=(cfg.augment_min_scale, 1.0), ratio=first.ratio, interpolation=first.interpolation
        )
        if cfg.augment_hflip:
            steps.insert(1, RandomHorizontalFlip())
        return Compose(steps)
    return encoder.preprocess_train


def decode_cache(
    matcher: Matcher, records: Sequence[Record], cfg: TrainCfg, rank: int, size: int
) -> DecodedImages | None:
    """The decoded training images (built by rank 0 on first use), or None to stream (cache off or too large)."""
    if cfg.decode_cache.lower() in ("none", "off", "") or cfg.feature_cache:
        return None
    h, w = matcher.image_encoder.image_size
    side = max(h, w) if not cfg.augment else math.ceil(max(h, w) * 1.15 / 8) * 8  # a margin for the crops
    if DecodedImages.nbytes(len(records), side) > cfg.decode_cache_max_gb * 2**30:
        log.warning(
            "the decoded training set would take %.1f GB > train.decode_cache_max_gb=%s; streaming from the files",
            DecodedImages.nbytes(len(records), side) / 2**30,
            cfg.decode_cache_max_gb,
        )
        return None
    folder = default_cache_dir() if cfg.decode_cache.lower() == "auto" else Path(cfg.decode_cache)
    kwargs = dict(dataset=cfg.data, split=cfg.split, cfg=train_data_cfg(cfg), workers=os.cpu_count() or 1)
    if size > 1 and rank != 0:
        barrier()  # rank 0 builds it
    started = time.perf_counter()
    decoded = DecodedImages.open_or_build(records, side, folder, **kwargs)
    if size > 1 and rank == 0:
        barrier()
    if decoded.built:
        log.info(
            "decoded %d training images at %d px in %.1f s -> %s",
            len(records),
            side,
            time.perf_counter() - started,
            decoded.folder,
        )
    return decoded


@dataclass
class FeatureCache:
    """Encoder outputs of every training image and caption (frozen encoders: encoded once, before training), in
    host memory; micro-batches are moved to the device."""

    images: ImageFeatures  # encoder outputs of every training image (eval transform)
    texts: TextFeatures  # every caption
    first_caption: torch.Tensor  # (N,) index in `texts` of each image's first caption
    captions: list[str]  # the captions of `texts`, in order
    good: torch.Tensor  # (N,) bool, image decoded
    rejects: list[Reject]  # why the other images did not


_NONE_DECODED = "none of the training images of {} could be read (why: rejects.jsonl in the run folder)"


def build_feature_cache(matcher: Matcher, records: Sequence[Record], cfg: TrainCfg) -> FeatureCache:
    """Encode every training image (eval transform) and caption once."""
    try:
        encoded = encode_records(matcher, records, batch_size=cfg.batch_size, workers=cfg.workers)
    except NothingReadable as err:
        raise NothingReadable(_NONE_DECODED.format(cfg.data), err.rejects) from None
    good = torch.zeros(len(records), dtype=torch.bool)
    good[encoded.indices] = True
    pooled = encoded.features.pooled.new_zeros(len(records), *encoded.features.pooled.shape[1:])
    tokens = encoded.features.tokens.new_zeros(len(records), *encoded.features.tokens.shape[1:])
    pooled[good], tokens[good] = encoded.features.pooled, encoded.features.tokens
    captions = [c for r in records for c in r.captions]
    # host memory, not the accelerator's: every caption's token states padded to the longest caption are the bulk
    # (Flickr30k's 145k captions x 77 x 512 floats are 23 GB); each micro-batch goes to the device on its own
    texts = encode_texts(matcher, captions, batch_size=4 * cfg.batch_size).to("cpu")
    counts = torch.tensor([len(r.captions) for r in records])
    first = torch.cumsum(counts, 0) - counts
    return FeatureCache(ImageFeatures(pooled, tokens).to("cpu"), texts, first, captions, good, encoded.rejects)


@dataclass
class MicroBatch:
    """What one micro-batch feeds the losses."""

    images: torch.Tensor | ImageFeatures  # pixels (I, 3, H, W), or encoder outputs from the feature cache
    texts: torch.Tensor | TextFeatures  # caption token ids (B, C), or encoder outputs from the feature cache
    n: int  # rows (image, caption pairs); < 2 is skipped
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # extra labelled ITM pairs (`dataset_pairs`)
    known: torch.Tensor | None  # (B, B) bool, caption j is true of row i's image too (`known_matches`)
    image_rows: torch.Tensor | None = None  # (B,) which of the I images each row is (None: row i is image i)


class BatchSource:
    """Micro-batches of an `EpochPlan` for one rank, from the feature cache, the decoded-image cache or the files.

    Args:
        matcher: the model (its transforms and tokenizer; the feature cache also runs its encoders once).
        records: the training records (only those whose image decoded are kept; see `rejects`).
        cfg: the training settings.
        rank, size: this process and the number of processes.
        negative_of: image_id -> {caption: its hard negative}, for `train.dataset_negatives`.
        also_true: image_id -> other captions true of it, never drawn as its negatives.
    """

    def __init__(
        self,
        matcher: Matcher,
        records: Sequence[Record],
        cfg: TrainCfg,
        rank: int,
        size: int,
        negative_of: dict[str, dict[str, str]],
        also_true: dict[str, list[str]],
    ):
        self.matcher, self.cfg, self.rank = matcher, cfg, rank
        self.negative_of, self.also_true = negative_of, also_true
        self.rejects: list[Reject] = []  # every image found unusable so far (streamed: as the batches meet them)
        self._rejected: set[int] = set()  # streamed: positions in `records` already in `rejects`
        self._reported = 0  # how many of `rejects` `new_rejects` has handed out
        self.cache = build_feature_cache(matcher, records, cfg) if cfg.feature_cache else None
        if self.cache is not None:
            self.rejects = list(self.cache.rejects)
        self.unit_texts = None  # the cache's caption embeddings as unit vectors, for the paraphrase mask
        self.paraphrase_cosine = cfg.paraphrase_cosine  # `train.paraphrase_share` sets it below, from the batches
        if self.cache is not None and (cfg.paraphrase_cosine > 0 or cfg.paraphrase_share > 0):
            self.unit_texts = torch.nn.functional.normalize(self.cache.texts.pooled.float(), dim=-1)
        self.decoded = decode_cache(matcher, records, cfg, rank, size)
        if self.decoded is not None:
            self.rejects = self.decoded.rejects
            self.decoded_rows = np.flatnonzero(self.decoded.ok)  # training records are the images that decoded
            records = [records[i] for i in self.decoded_rows]
            if not records:
                raise NothingReadable(_NONE_DECODED.format(cfg.data), self.rejects)
            self.mean, self.std = normalisation(matcher.image_encoder.preprocess)
        self.records = records
        counts = [len(r.captions) for r in records]
        if self.cache is not None and cfg.neighbour_batches:
            nearest = nearest_images(self.cache.images.pooled.to(matcher.device), self.cache.good)
            self.plan = NeighbourPlan(nearest, counts, cfg.batch_size, size, cfg.seed, cfg.neighbour_batches)
        else:
            self.plan = EpochPlan(len(records), counts, cfg.batch_size, size, cfg.seed, cfg.captions_per_image)
        if self.unit_texts is not None and cfg.paraphrase_share > 0:

            def known_of(images: list[int], drawn: list[int]) -> torch.Tensor:
                captions = [self.cache.captions[c] for c in drawn]
                return known_matches([self.records[i] for i in images], captions, self.also_true)

            self.paraphrase_cosine = paraphrase_threshold(
                self.cache, self.unit_texts, torch.tensor(counts), self.plan, cfg.paraphrase_share, known_of
            )

    def new_rejects(self) -> list[Reject]:
        """The rejects found since the last call (all of them at the first), for the run's rejects.jsonl."""
        new = self.rejects[self._reported :]
        self._reported = len(self.rejects)
        return new

    def batches(self, first: int, count: int) -> Iterator[MicroBatch]:
        """Global micro-batches first, first + 1, ... (`count` of them when streaming from files)."""
        if self.cache is not None:
            return self._cached(first)
        if self.decoded is not None:
            return self._decoded(first)
        return self._streamed(first, count)

    def _labelled(self, records: Sequence[Record], captions: list[str]):
        pairs = dataset_pairs(self.matcher, records, captions, self.negative_of) if self.negative_of else None
        return pairs, known_matches(records, captions, self.also_true)

    def _cached(self, m: int) -> Iterator[MicroBatch]:
        cache, records = self.cache, self.records
        while True:
            _, images, captions = self.plan.micro_batch(m, self.rank)
            keep = [k for k, i in enumerate(images) if cache.good[i]]  # rows whose image decoded
            idx = torch.tensor([images[k] for k in keep], dtype=torch.long)
            cap = cache.first_caption[idx] + torch.tensor([captions[k] for k in keep], dtype=torch.long)
            dev = self.matcher.device
            rows = [records[i] for i in idx.tolist()]
            drawn = [cache.captions[c] for c in cap.tolist()]
            known = known_matches(rows, drawn, self.also_true)
            if self.unit_texts is not None:
                counts = torch.tensor([len(r.captions) for r in rows])
                known |= paraphrase_matches(
                    self.unit_texts, cache.first_caption[idx], counts, cap, self.paraphrase_cosine
                )
            known = known.to(dev)
            yield MicroBatch(cache.images.select(idx).to(dev), cache.texts.select(cap).to(dev), len(idx), None, known)
            m += 1

    def _decoded(self, m: int) -> Iterator[MicroBatch]:
        cfg = self.cfg
        h, w = self.matcher.image_encoder.image_size
        while True:
            _, images, caption_idx = self.plan.micro_batch(m, self.rank)
            distinct, image_rows = distinct_images(images)
            generator = torch.Generator().manual_seed(mix_seed(cfg.seed, m, self.rank, 4))  # this micro-batch's crops
            pixels = augment_batch(
                self.decoded.batch(self.decoded_rows[distinct]),
                (h, w),
                self.mean,
                self.std,
                min_scale=cfg.augment_min_scale if cfg.augment else None,
                hflip=cfg.augment and cfg.augment_hflip,
                generator=generator,
            )
            rows = [self.records[i] for i in images]
            captions = [r.captions[c] for r, c in zip(rows, caption_idx)]
            tokens = self._tokenize(captions, m)
            yield MicroBatch(pixels, tokens, len(captions), *self._labelled(rows, captions), image_rows)
            m += 1

    def _streamed(self, first: int, count: int) -> Iterator[MicroBatch]:
        cfg = self.cfg
        h, w = self.matcher.image_encoder.image_size
        transform = streaming_transform(self.matcher, cfg)
        dataset = PlannedImages(
            self.records, self.plan, first, count, self.rank, transform, train_data_cfg(cfg), (w, h)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
        )
        for m, (batch, planned) in enumerate(loader, start=first):
            self._note_rejects(batch.rejects)
            if batch.pixels is None:
                yield MicroBatch(None, None, 0, None, None)
                continue
            loaded = {image: k for k, image in enumerate(batch.indices)}  # rejected images drop their rows
            kept = [(loaded[image], caption) for image, caption in planned if image in loaded]
            rows = [batch.records[k] for k, _ in kept]
            captions = [record.captions[c] for record, (_, c) in zip(rows, kept)]
            image_rows = None if self.plan.per_image == 1 else torch.tensor([k for k, _ in kept])
            tokens = self._tokenize(captions, m)
            yield MicroBatch(batch.pixels, tokens, len(captions), *self._labelled(rows, captions), image_rows)

    def _tokenize(self, captions: list[str], m: int) -> torch.Tensor:
        """Token ids of micro-batch m's captions after its word dropout (labels keep the captions as written)."""
        if self.cfg.caption_word_drop > 0:
            generator = torch.Generator().manual_seed(mix_seed(self.cfg.seed, m, self.rank, 5))
            captions = drop_words(captions, self.cfg.caption_word_drop, generator)
        return self.matcher.tokenize(captions)

    def _note_rejects(self, rejects: list[tuple[int, Reject]]) -> None:
        """Keep each streamed reject once (an image is met every epoch); stop when no training image is usable."""
        for image, reject in rejects:
            if image not in self._rejected:
                self._rejected.add(image)
                self.rejects.append(reject)
        if len(self._rejected) == len(self.records):
            raise NothingReadable(_NONE_DECODED.format(self.cfg.data), self.rejects[self._reported :])
