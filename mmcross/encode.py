"""The encoding stage: records, image files, pixels or captions -> batches of unit vectors (+ tokens and masks).

Every job that runs the encoders over many items goes through here: index build, eval, the training feature cache,
hard-negative eval, `score`, search queries and `embed`. Images are decoded in DataLoader workers
(`mmcross.data.loader`), bad ones become reject records, and the matcher's `encode_image` / `encode_text` give
`ImageFeatures` / `TextFeatures` whose `pooled` rows are unit vectors (the one place they are normalised).

Captions are batched by length (short with short), so the text tower's batches are cut to little padding, and come
back in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcross.config import DataCfg
from mmcross.data.images import try_decode
from mmcross.data.loader import image_loader
from mmcross.data.records import NothingReadable, Record, Reject, blank_caption
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.model import Matcher
from mmcross.progress import Progress


@dataclass
class EncodedImages:
    """One batch of `encode_images`: the images that decoded, their features, and the rejects."""

    indices: list[int]  # position in the input of each encoded image
    records: list[Record]  # their records, in the same order
    features: ImageFeatures | None  # (B, ...) encoder outputs; None when the whole batch was rejected
    rejects: list[tuple[int, Reject]]  # (position in the input, why the image could not be used)


@torch.inference_mode()
def encode_images(
    matcher: Matcher,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    workers: int = 0,
    cfg: DataCfg | None = None,
    tokens: bool = True,
    draft: bool = False,
    batches: Sequence[Sequence[int]] | None = None,
) -> Iterator[EncodedImages]:
    """Stream the encoder outputs of `records`' images in input order (eval transform), batch by batch.

    Args:
        matcher: the model.
        records: images to encode (their captions are not used).
        batch_size: images per encoder call.
        workers: DataLoader decoding processes (0: decode in this process).
        cfg: decoding options (pixel limit, background); None = defaults.
        tokens: keep the patch tokens (re-ranking needs them); False keeps `pooled` only (tokens set to an empty
            (B, 0, Dv) tensor).
        draft: decode JPEGs at the smallest DCT scale at least the model's input size (faster on large photos;
            pixels differ slightly from a full decode).
        batches: the positions of each encoder call, instead of runs of `batch_size` (an int8 graph quantises its
            activations per call, so its vectors depend on what else is in the batch).
    """
    encoder = matcher.image_encoder
    loader = image_loader(
        records,
        encoder.preprocess,
        batch_size=batch_size,
        workers=workers,
        cfg=cfg,
        draft_size=tuple(encoder.image_size[::-1]) if draft else None,
        batches=batches,
    )
    for batch in loader:
        features = None
        if batch.pixels is not None:
            features = _keep_tokens(matcher.encode_image(batch.pixels), tokens)
        yield EncodedImages(batch.indices, batch.records, features, batch.rejects)


def _keep_tokens(features: ImageFeatures, tokens: bool) -> ImageFeatures:
    return features if tokens else ImageFeatures(features.pooled, features.tokens[:, :0])


@dataclass
class EncodedRecords:
    """Every image of some records that decoded, encoded: rows of `features` follow `records`."""

    features: ImageFeatures  # (N, ...) on the CPU
    indices: list[int]  # the N positions in the input whose image decoded, ascending
    records: list[Record]  # their records (without image bytes)
    rejects: list[Reject]  # the images that did not


def encode_records(
    matcher: Matcher,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    workers: int = 0,
    cfg: DataCfg | None = None,
    tokens: bool = True,
    progress: Progress | None = None,
) -> EncodedRecords:
    """All of `encode_images` gathered: the features of every image that decoded (for eval and feature caches).

    Args:
        progress: advanced by the images of each batch (rejected ones included).

    Raises:
        ValueError: no image could be decoded.
    """
    parts, indices, kept, rejects = [], [], [], []
    for batch in encode_images(matcher, records, batch_size=batch_size, workers=workers, cfg=cfg, tokens=tokens):
        if progress is not None:
            progress.advance(len(batch.indices) + len(batch.rejects))
        rejects += [reject for _, reject in batch.rejects]
        if batch.features is not None:
            parts.append(batch.features.to("cpu"))
            indices += batch.indices
            kept += batch.records
    if not parts:
        raise NothingReadable("no image could be read (see the rejects)", rejects)
    return EncodedRecords(ImageFeatures.cat(parts), indices, kept, rejects)


def image_file_records(paths: Sequence[str | Path], root: str | Path | None = None) -> list[Record]:
    """Records of bare image files (relative paths resolve against `root`), for `encode_images`."""
    out = []
    for i, path in enumerate(paths):
        path = Path(path)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        out.append(Record(image_id=str(i), captions=[], path=path))
    return out


@torch.inference_mode()
def encode_pixels(
    matcher: Matcher,
    pixels: torch.Tensor,
    *,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    prepare: bool = False,
) -> ImageFeatures:
    """Encode (N, 3, H, W) preprocessed images into features, optionally with the fusion-dependent fields.

    Args:
        matcher: the model.
        pixels: preprocessed images.
        batch_size: images per encoder call.
        dtype: floating dtype of the result (float16 halves a cache's size; scores then move ~1e-3).
        prepare: also fill `states` / `kv` (`Matcher.prepare`), so re-ranking reuses them.
    """
    parts = []
    for start in range(0, len(pixels), batch_size):
        features = matcher.encode_image(pixels[start : start + batch_size])
        parts.append(matcher.prepare(features) if prepare else features)
    return ImageFeatures.cat(parts).to(dtype=dtype)


@torch.inference_mode()
def encode_texts(
    matcher: Matcher,
    captions: Sequence[str] | torch.Tensor,
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    prepare: bool = False,
    tokens: bool = True,
) -> TextFeatures:
    """Encode N captions (or token ids (N, C)) into features in input order, token rows padded to the longest.

    Captions are encoded in batches of similar length (each batch cut to its longest caption).

    Args:
        matcher: the model.
        captions: the captions; an empty or blank one is an error.
        batch_size: captions per encoder call.
        dtype: floating dtype of the result.
        prepare: also fill the fusion-dependent `states`.
        tokens: keep token states and masks; False keeps `pooled` only (tokens and mask of width 0).
    """
    if not isinstance(captions, torch.Tensor):
        refuse_empty_captions(captions)
    ids = matcher.tokenize(captions if isinstance(captions, torch.Tensor) else list(captions))  # (N, C)
    padding_mask = getattr(matcher.text_encoder, "padding_mask", None)  # an injected encoder may not say
    order = torch.arange(len(ids))
    if padding_mask is not None:
        order = torch.argsort(padding_mask(ids).sum(dim=1), stable=True).cpu()  # (N,) shortest first
    parts = []
    for start in range(0, len(ids), batch_size):
        features = matcher.encode_text(ids[order[start : start + batch_size].to(ids.device)])
        if prepare:
            features = matcher.prepare(features)
        if not tokens:
            features = TextFeatures(features.pooled, features.tokens[:, :0], features.mask[:, :0])
        parts.append(features.to("cpu"))
    if not parts:
        width = matcher.text_encoder.token_dim
        return TextFeatures(
            torch.zeros(0, matcher.image_encoder.embed_dim),
            torch.zeros(0, 0, width),
            torch.zeros(0, 0, dtype=torch.bool),
        )
    merged = TextFeatures.cat(parts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return merged.select(inverse).to(dtype=dtype) if tokens else _rows(merged, inverse).to(dtype=dtype)


def refuse_empty_captions(captions: Sequence[str]) -> None:
    """Raise ValueError naming the positions of captions that hold no words (`blank_caption`)."""
    empty = [i for i, caption in enumerate(captions) if blank_caption(caption)]
    if empty:
        raise ValueError(f"empty caption at position(s) {empty}")


def _rows(features: TextFeatures, index: torch.Tensor) -> TextFeatures:
    """Rows of pooled-only features (`select` would cut the empty token axis to width 1)."""
    return TextFeatures(features.pooled[index], features.tokens[index], features.mask[index])


@torch.inference_mode()
def encode_query(
    matcher: Matcher, text: str | None = None, image: str | Path | None = None
) -> ImageFeatures | TextFeatures:
    """The features (one row) of a search query: a caption, or an image file.

    Raises:
        ValueError: an empty caption, neither or both given, or an image that cannot be decoded.
        FileNotFoundError: no such image file.
    """
    if (text is None) == (image is None):
        raise ValueError("a query is a caption or an image, not both or neither")
    if text is not None:
        if blank_caption(text):
            raise ValueError("empty query caption")
        return matcher.encode_text(text).to("cpu")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"no query image {path}")
    decoded = try_decode(path, str(path))
    if isinstance(decoded, Reject):
        raise ValueError(f"cannot read query image {path}: {decoded.reason}")
    return matcher.encode_image(matcher.image_encoder.preprocess(decoded.image)[None]).to("cpu")


def embed(
    matcher: Matcher,
    *,
    images: Sequence[str | Path] = (),
    captions: Sequence[str] = (),
    batch_size: int = 64,
    out: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, E) float32 unit vectors: the image files first, then the captions (`mmcross embed`); also saved to the
    .npy file `out` when given. `progress` shows the items done on stderr.

    Raises:
        ValueError: an image that cannot be decoded (named), or an empty caption.
    """
    parts = []
    with Progress(len(images) + len(captions), "embedding", "items", enabled=progress) as bar:
        for batch in encode_images(matcher, image_file_records(images), batch_size=batch_size, tokens=False):
            if batch.rejects:
                bad = batch.rejects[0][1]
                raise ValueError(f"cannot read image {bad.path}: {bad.reason}")
            parts.append(batch.features.pooled.cpu().numpy())
            bar.advance(len(batch.indices))
        if captions:
            parts.append(encode_texts(matcher, captions, batch_size=batch_size, tokens=False).pooled.numpy())
            bar.advance(len(captions))
    vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, matcher.image_encoder.embed_dim))
    if out is not None:
        np.save(npy_path(out), vectors.astype(np.float32))
    return vectors.astype(np.float32)


def npy_path(out: str | Path) -> Path:
    """The file `embed(out=...)` writes: `out`, with .npy added when its name lacks it (as `numpy.save` does)."""
    out = Path(out)
    return out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
