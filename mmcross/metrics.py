"""Retrieval metrics: pure functions over a similarity matrix and the caption -> image ground truth.

Names follow CLIP_benchmark: `image_retrieval_recall@K` is text -> image (a caption retrieves its image),
`text_retrieval_recall@K` is image -> text (an image retrieves any of its captions). Recalls are in [0, 1].

Ranks are 1-based and pessimistic about ties: a true match ranks behind every wrong candidate scoring at least as
high, so a model that scores everything the same gets the worst rank, not the best.
"""

from __future__ import annotations

import torch

DEFAULT_KS = (1, 5, 10)


def text_to_image_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """1-based rank of each caption's image among all images.

    Args:
        similarity: (N_images, N_captions) scores, higher is better.
        caption_image: (N_captions,) index of the image each caption describes.

    Returns:
        (N_captions,) ranks.
    """
    columns = torch.arange(similarity.shape[1], device=similarity.device)
    true_score = similarity[caption_image, columns]  # (N_captions,)
    return (similarity >= true_score[None, :]).sum(dim=0)  # counts the true image itself, hence 1-based


def image_to_text_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """1-based rank of each image's best-ranked caption among all captions (any of its captions counts).

    Images without captions get rank 0 and are left out of the metrics by `retrieval_metrics`.

    Args:
        similarity: (N_images, N_captions) scores, higher is better.
        caption_image: (N_captions,) index of the image each caption describes.

    Returns:
        (N_images,) ranks.
    """
    n_images = similarity.shape[0]
    rows = torch.arange(n_images, device=similarity.device)
    own = caption_image[None, :] == rows[:, None]  # (N_images, N_captions) True at an image's own captions
    best_true = similarity.masked_fill(~own, float("-inf")).max(dim=1).values  # (N_images,)
    # Other captions of the same image never push the best one down: 1 + captions of other images that tie or beat it.
    ranks = 1 + ((similarity >= best_true[:, None]) & ~own).sum(dim=1)  # (N_images,)
    return ranks.masked_fill(~own.any(dim=1), 0)


def recall_at_k(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose rank is at most K, for each K."""
    return {k: float((ranks <= k).float().mean()) for k in ks}


def retrieval_metrics(
    similarity: torch.Tensor, caption_image: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, float]:
    """The standard image-text retrieval protocol on one similarity matrix.

    Returns recall@K both ways, median ranks (1-based) and `rsum`, the sum of the 2 * len(ks) recalls in
    percent (0-600 for the usual K = 1, 5, 10, as papers report it).
    """
    similarity = similarity.float()
    caption_image = caption_image.to(similarity.device).long()
    t2i = text_to_image_ranks(similarity, caption_image)
    i2t = image_to_text_ranks(similarity, caption_image)
    i2t = i2t[i2t > 0]  # images with at least one caption
    metrics: dict[str, float] = {}
    for k, value in recall_at_k(t2i, ks).items():
        metrics[f"image_retrieval_recall@{k}"] = value
    for k, value in recall_at_k(i2t, ks).items():
        metrics[f"text_retrieval_recall@{k}"] = value
    metrics["image_retrieval_median_rank"] = float(t2i.float().median())
    metrics["text_retrieval_median_rank"] = float(i2t.float().median())
    metrics["rsum"] = 100.0 * sum(v for key, v in metrics.items() if "recall@" in key)
    return metrics
