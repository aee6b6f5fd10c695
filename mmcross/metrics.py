"""Retrieval metrics: pure functions over a similarity matrix and the caption -> image ground truth.

Names follow CLIP_benchmark: `image_retrieval_recall@K` is text -> image (a caption retrieves its image),
`text_retrieval_recall@K` is image -> text (an image retrieves any of its captions). Recalls are in [0, 1].

Ground truth is each caption's image, or a full (N_images, N_captions) `matches` table: `mmcross.evaluate` counts a
caption written word for word under several images as describing all of them (no model can tell two copies of one
string apart, so which copy ranks first would otherwise be decided by ties). With unique captions the two agree.

Ranks are 1-based and pessimistic about ties: a true match ranks behind every wrong candidate scoring at least as
high, so a model that scores everything the same gets the worst rank, not the best.
"""

from __future__ import annotations

import math

import torch

DEFAULT_KS = (1, 5, 10)


def match_matrix(caption_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """(N_images, N_captions) bool, True where caption j describes image i, from each caption's image index."""
    return caption_image[None, :] == torch.arange(n_images, device=caption_image.device)[:, None]


def _ranks_by_row(similarity: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's best-scoring true column; 0 for rows without one.

    Other true columns never push the best one down: 1 + false columns that tie or beat it.
    """
    best_true = similarity.masked_fill(~matches, float("-inf")).max(dim=1).values  # (R,)
    ranks = 1 + ((similarity >= best_true[:, None]) & ~matches).sum(dim=1)  # (R,)
    return ranks.masked_fill(~matches.any(dim=1), 0)


def text_to_image_ranks(
    similarity: torch.Tensor, caption_image: torch.Tensor, matches: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each caption's image among all images.

    Args:
        similarity: (N_images, N_captions) scores, higher is better.
        caption_image: (N_captions,) index of the image each caption describes.
        matches: (N_images, N_captions) bool, every image each caption describes (a caption repeated word for word
            under several images describes them all); None = `caption_image` alone. The best-ranked one counts.

    Returns:
        (N_captions,) ranks.
    """
    if matches is None:
        matches = match_matrix(caption_image, similarity.shape[0])
    return _ranks_by_row(similarity.T, matches.T.to(similarity.device))


def image_to_text_ranks(
    similarity: torch.Tensor, caption_image: torch.Tensor, matches: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each image's best-ranked caption among all captions (any of its captions counts).

    Images without captions get rank 0 and are left out of the metrics by `retrieval_metrics`.

    Args:
        similarity: (N_images, N_captions) scores, higher is better.
        caption_image: (N_captions,) index of the image each caption describes.
        matches: (N_images, N_captions) bool, every caption that describes each image; None = `caption_image`.

    Returns:
        (N_images,) ranks.
    """
    if matches is None:
        matches = match_matrix(caption_image, similarity.shape[0])
    return _ranks_by_row(similarity, matches.to(similarity.device))


def median_rank(ranks: torch.Tensor) -> float:
    """Median of 1-based ranks as VSE++ and SCAN report it (`floor(np.median(ranks))`): with an even count, the
    mean of the two middle ranks, rounded down. `torch.median` would return the lower middle rank instead."""
    ordered = ranks.sort().values
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) // 2)


def recall_at_k(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose rank is at most K, for each K."""
    return {k: float((ranks <= k).float().mean()) for k in ks}


def retrieval_metrics(
    similarity: torch.Tensor,
    caption_image: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    matches: torch.Tensor | None = None,
) -> dict[str, float]:
    """The standard image-text retrieval protocol on one similarity matrix.

    `matches` (N_images, N_captions) bool widens the ground truth beyond `caption_image` (see `text_to_image_ranks`).

    Returns recall@K both ways, median ranks (1-based) and `rsum`, the sum of the 2 * len(ks) recalls in
    percent (0-600 for the usual K = 1, 5, 10, as papers report it).
    """
    similarity = similarity.float()
    caption_image = caption_image.to(similarity.device).long()
    if matches is None:
        matches = match_matrix(caption_image, similarity.shape[0])
    t2i = text_to_image_ranks(similarity, caption_image, matches)
    i2t = image_to_text_ranks(similarity, caption_image, matches)
    i2t = i2t[i2t > 0]  # images with at least one caption
    metrics: dict[str, float] = {}
    for k, value in recall_at_k(t2i, ks).items():
        metrics[f"image_retrieval_recall@{k}"] = value
    for k, value in recall_at_k(i2t, ks).items():
        metrics[f"text_retrieval_recall@{k}"] = value
    metrics["image_retrieval_median_rank"] = median_rank(t2i)
    metrics["text_retrieval_median_rank"] = median_rank(i2t)
    metrics["rsum"] = 100.0 * sum(v for key, v in metrics.items() if "recall@" in key)
    return metrics


def sign_test(up: int, down: int) -> float:
    """Two-sided exact sign test: the probability of a split at least as uneven as `up` : `down` under a fair coin
    (ties are left out before calling)."""
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(up, down) + 1)) / 2**n
    return min(1.0, 2 * tail)


def rank_changes(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Per-query effect of a re-ranking: how many queries' true match moved up, down or stayed, and the sign test.

    Args:
        before: (Q,) 1-based ranks of each query's true match (0 = no true match, left out), e.g. dual encoder.
        after: (Q,) the same queries' ranks after re-ranking.
    """
    keep = (before > 0) & (after > 0)
    before, after = before[keep], after[keep]
    up, down = int((after < before).sum()), int((after > before).sum())
    return {"up": up, "down": down, "same": int(keep.sum()) - up - down, "sign_test_p": sign_test(up, down)}
