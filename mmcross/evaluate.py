"""The standard image-text retrieval protocol, for the dual encoder alone and after fusion re-ranking.

Every image of a split is scored against every caption of the split (any number of captions per image). The dual
encoder ranks by ITC cosine. Re-ranking then rescores each query's top K candidates with the matcher's ranking score
(`score` = itm + itc_weight * itc) and keeps them, in that order, ahead of every other candidate, which keep their
ITC order; text -> image re-ranks each caption's K best images, image -> text each image's K best captions.
Metrics come from `mmcross.metrics.retrieval_metrics` (CLIP_benchmark names, recalls in [0, 1]).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmcross.config import DataCfg, InferenceCfg, ModelRef, to_dict
from mmcross.data.records import NothingReadable, Record, Reject, caption_key
from mmcross.dist import check_device
from mmcross.encode import encode_records, encode_texts
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.metrics import DEFAULT_KS, image_to_text_ranks, rank_changes, retrieval_metrics, text_to_image_ranks
from mmcross.model import Matcher
from mmcross.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_RERANK_K = 16  # `run_eval` re-ranks this many candidates per query when the head was trained


@dataclass
class EncodedSplit:
    """The encoder outputs of a split: images, their captions flattened, and which image each caption describes."""

    images: ImageFeatures  # N images (encoder outputs only)
    texts: TextFeatures  # M captions
    caption_image: torch.Tensor  # (M,) index into `images` of each caption's image
    records: list[Record]  # N: the records whose image decoded, in `images`' order (ids may repeat)
    rejects: int  # images that could not be decoded (left out with their captions)
    matches: torch.Tensor  # (N, M) bool: caption j is, word for word (`caption_key`), one of image i's captions
    rejected: list[Reject] = field(default_factory=list)  # their reject records


def same_text_matches(captions: Sequence[str], caption_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """(N_images, N_captions) bool: caption j's text is one of image i's captions (by `caption_key`).

    Equal to each caption's own image when captions are unique; a caption repeated under several images (COCO has
    such, the synthetic set's "a red square" many) describes all of them.
    """
    group: dict[str, int] = {}
    text_group = torch.tensor([group.setdefault(caption_key(c), len(group)) for c in captions], dtype=torch.long)
    has = torch.zeros(n_images, len(group), dtype=torch.bool)  # (N, G) image i has a caption of text group g
    has[caption_image, text_group] = True
    return has[:, text_group]  # (N, M)


def encode_split(
    matcher: Matcher, records: Sequence[Record], batch_size: int = 64, workers: int = 0, progress: bool = False
) -> EncodedSplit:
    """Encode every image (eval transform) and every caption of `records` once."""
    records = [r for r in records if r.captions]
    try:
        with Progress(len(records), "eval: encoding", "images", enabled=progress) as bar:
            encoded = encode_records(matcher, records, batch_size=batch_size, workers=workers, progress=bar)
    except ValueError:
        raise NothingReadable("no image of the split could be read (missing or unreadable files)") from None
    captions = [c for record in encoded.records for c in record.captions]
    caption_image = torch.tensor([i for i, record in enumerate(encoded.records) for _ in record.captions])
    texts = encode_texts(matcher, captions, batch_size=4 * batch_size)
    kept = [records[i] for i in encoded.indices]  # with their image bytes, where the data holds them
    matches = same_text_matches(captions, caption_image, len(kept))
    return EncodedSplit(
        encoded.features, texts, caption_image, kept, len(encoded.rejects), matches, list(encoded.rejects)
    )


@torch.no_grad()
def rerank_similarity(
    matcher: Matcher,
    images: ImageFeatures,
    texts: TextFeatures,
    similarity: torch.Tensor,
    k: int,
    *,
    by: str = "column",
    batch_pairs: int = 1024,
    progress: bool = False,
    shown: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`similarity` (N_img, N_cap) with each query's top-k candidates rescored by the fusion and moved ahead.

    Args:
        matcher: supplies the ranking score.
        images: the N_img images' features, prepared (`Matcher.prepare`) so no candidate repeats that work.
        texts: the N_cap captions' features, prepared.
        similarity: dual-encoder scores.
        k: candidates per query.
        by: "column" re-ranks each caption's images (text -> image), "row" each image's captions (image -> text).
        batch_pairs: pairs per fusion call.
        progress: show the queries done on stderr.
        shown: also return the scores to show beside the ranking: the ranking score for the top k, ITC elsewhere.

    Returns:
        (N_img, N_cap) scores whose ranking per column (or row) is the re-ranked one (the top k lifted by a
        per-query constant), and with `shown` that matrix of shown scores.
    """
    sim = similarity if by == "row" else similarity.T  # (Q, C) queries x candidates
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (Q, k)
    # Candidates outside the top k keep their exact ITC; the top k's scores are lifted above the query's best ITC by
    # a per-query constant (their order unchanged). Pushing the others down by a large constant instead rounded
    # near-equal ITC scores to ties in float32, and ties count against the true match.
    out = sim.float().clone()
    ceiling = out.max(dim=1).values  # (Q,)
    display = out.clone() if shown else None
    queries_per_call = max(1, batch_pairs // max(k, 1))
    what = "text -> image" if by == "column" else "image -> text"
    bar = Progress(sim.shape[0], f"eval: re-ranking {what}", "queries", enabled=progress)
    for start in range(0, sim.shape[0], queries_per_call):
        q = torch.arange(start, min(start + queries_per_call, sim.shape[0]))
        cand = top[q]  # (q, k)
        q_flat = q[:, None].expand_as(cand).reshape(-1)  # (q*k,)
        c_flat = cand.reshape(-1)
        if by == "row":
            image_part, text_part = images.select(q_flat), texts.select(c_flat)
        else:
            image_part, text_part = images.select(c_flat), texts.select(q_flat)
        scores = matcher.score_pairs(image_part, text_part).score.float().cpu()  # (q*k,)
        scores = scores.view(len(q), k)
        lift = ceiling[q] + 1.0 - scores.min(dim=1).values  # (q,) puts every candidate above the query's rest
        out[q[:, None], cand] = scores + lift[:, None]
        if display is not None:
            display[q[:, None], cand] = scores
        bar.advance(len(q))
    bar.close()
    if by == "column":
        out, display = out.T, None if display is None else display.T
    return out if display is None else (out, display)


@torch.no_grad()
def evaluate(
    matcher: Matcher,
    records: Sequence[Record],
    k: int = 16,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch_size: int = 64,
    workers: int = 0,
    failures: int = 0,
    progress: bool = False,
    on_rejects: Callable[[list[Reject]], None] | None = None,
) -> dict[str, Any]:
    """Recall@K both ways, median ranks and rsum for the dual encoder and after re-ranking its top `k`.

    Args:
        on_rejects: called with the reject records of the images that could not be read (a training run writes
            them to its rejects.jsonl); the result counts them under "rejects" either way.
        progress: show encoding and re-ranking progress on stderr (off inside a training run, which shows its own).
        failures: also return the this many worst queries of each direction (true match ranked lowest, by the
            re-ranked order when `k` > 0), as `mmcross.report.gallery.Failure` objects under "failures".

    Returns:
        {"metrics", "rerank_metrics" (None when k = 0), "rerank_effect" (per direction: queries whose true match
        the re-rank moved up / down / not, and the sign test's p; None when k = 0), "images", "captions", "rejects",
        "seconds"[, "failures"]}.
    """
    was_training = matcher.training
    matcher.eval()
    start = time.perf_counter()
    try:
        split = encode_split(matcher, records, batch_size=batch_size, workers=workers, progress=progress)
        if on_rejects is not None and split.rejected:
            on_rejects(split.rejected)
        similarity = split.images.pooled.float() @ split.texts.pooled.float().T  # (N_img, N_cap)
        metrics = retrieval_metrics(similarity, split.caption_image, ks, split.matches)
        rerank = rerank_effect = None
        t2i_sim = i2t_sim = t2i_shown = i2t_shown = similarity
        if k > 0:
            images = matcher.prepare(split.images.to(dtype=matcher.dtype))
            texts = matcher.prepare(split.texts.to(dtype=matcher.dtype))
            rescore = dict(progress=progress, shown=failures > 0)
            t2i_sim = rerank_similarity(matcher, images, texts, similarity, k, by="column", **rescore)
            i2t_sim = rerank_similarity(matcher, images, texts, similarity, k, by="row", **rescore)
            if failures > 0:
                (t2i_sim, t2i_shown), (i2t_sim, i2t_shown) = t2i_sim, i2t_sim
            t2i = retrieval_metrics(t2i_sim, split.caption_image, ks, split.matches)
            i2t = retrieval_metrics(i2t_sim, split.caption_image, ks, split.matches)
            rerank = {key: (t2i if key.startswith("image_") else i2t)[key] for key in metrics if key != "rsum"}
            rerank["rsum"] = 100.0 * sum(v for key, v in rerank.items() if "recall@" in key)
            # per query: did the re-rank move the true match up or down (the rsum alone hides a wash of both)
            rerank_effect = {
                "image_retrieval": rank_changes(
                    text_to_image_ranks(similarity, split.caption_image, split.matches),
                    text_to_image_ranks(t2i_sim, split.caption_image, split.matches),
                ),
                "text_retrieval": rank_changes(
                    image_to_text_ranks(similarity, split.caption_image, split.matches),
                    image_to_text_ranks(i2t_sim, split.caption_image, split.matches),
                ),
            }
    finally:
        matcher.train(was_training)
    result = {
        "metrics": metrics,
        "rerank_metrics": rerank,
        "rerank_effect": rerank_effect,
        "images": len(split.records),
        "captions": int(split.caption_image.numel()),
        "rejects": split.rejects,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if failures > 0:
        from mmcross.report.gallery import worst_failures

        captions = [c for record in split.records for c in record.captions]  # encode_split's order
        images = [(r.image_id, r.path or r.data) for r in split.records]
        result["failures"] = worst_failures(
            t2i_sim,
            i2t_sim,
            split.caption_image,
            captions,
            images,
            n=failures,
            matches=split.matches,
            shown=(t2i_shown, i2t_shown),
        )
    return result


def run_eval(
    dataset: str | Path,
    data_cfg: DataCfg,
    ref: ModelRef,
    *,
    k: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    max_images: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    html: str | Path | None = None,
    failures: int = 20,
    hard_negatives: bool = False,
    progress: bool = True,
    allow_untrained_head: bool = False,
    inference: InferenceCfg | None = None,
) -> dict[str, Any]:
    """`mmcross eval`: load the model `ref` names, evaluate one split, optionally write the JSON to `out`.

    `inference` picks how the encoders run (`mmcross.fast`; None: torch fp32); the report records it.

    `k` candidates per query are re-ranked; None means `DEFAULT_RERANK_K` when the fusion head was trained, and no
    re-ranking when it was not (the report says `"rerank_skipped": "untrained head"`); an explicit `k` > 0 with an
    untrained head raises `UntrainedHead` unless `allow_untrained_head`, and so does `hard_negatives`.

    Beside the JSON goes its recall@K curve (`out` with suffix .png); `html` gets a self-contained page of the
    `failures` worst queries of each direction and what ranked above their true match. With `hard_negatives`, the
    report also holds `hard_negatives`: how often each score prefers an image's caption over its swapped negative
    (`mmcross.hard_negatives`; the dataset must be a manifest with `negatives`, as `mmcross data synth` writes).
    """
    from mmcross.data.registry import open_dataset
    from mmcross.factory import load_matcher

    device = check_device(device, "--device")
    ds = open_dataset(dataset, data_cfg)
    records = [r for r in ds.records() if r.captions]
    if max_images:
        records = records[:max_images]
    if not records:
        raise ValueError(ds.nothing_in_split())
    matcher = load_matcher(ref, device=device, inference=inference)
    skipped = k is None and not matcher.head_trained
    if k is None:
        k = DEFAULT_RERANK_K if matcher.head_trained else 0
    elif k > 0 and not allow_untrained_head:
        matcher.require_trained_head("--rerank")
    if hard_negatives and not allow_untrained_head:
        matcher.require_trained_head("--hard-negatives")  # its itm and score accuracies would be the head's noise
    if hard_negatives:  # read before the recall pass, so a dataset without negatives fails at once
        from mmcross.data.synth import SYNTH_PARAMS, negative_kind, read_holdout, read_negatives

        negatives = read_negatives(dataset)
        if not negatives:
            raise ValueError(f"{dataset}: no caption has a hard negative (a manifest's `negatives` lists)")
        folder = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent
        kind_of = negative_kind if (folder / SYNTH_PARAMS).is_file() else None  # the synth grammar is known
    result = evaluate(
        matcher, records, k, batch_size=batch_size, workers=workers, failures=failures if html else 0, progress=progress
    )
    worst = result.pop("failures", None)
    report = {
        "dataset": str(dataset),
        "format": ds.format,
        "split": data_cfg.split,
        "model": _model_name(ref, matcher),
        "pretrained": matcher.cfg.encoder.pretrained,
        "head": matcher.head_info(),
        "inference": to_dict(matcher.inference),
        "k": k,
        **({"rerank_skipped": "untrained head"} if skipped else {}),
        **result,
    }
    if hard_negatives:
        from mmcross.hard_negatives import hard_negative_eval

        report["hard_negatives"] = hard_negative_eval(
            matcher, records, negatives, read_holdout(folder), batch_size=batch_size, kind_of=kind_of
        )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        from mmcross.report.plots import recall_curve

        recall_curve(report, out.with_suffix(".png"))
    if html is not None:
        from mmcross.report.gallery import write_failures_gallery

        stage = f"after re-ranking the top {k}" if k else "dual encoder"
        note = f"{report['model']} on {dataset} ({data_cfg.split or 'all'}), ranks {stage}."
        write_failures_gallery(worst or [], html, note=note)
    return report


def _model_name(ref: ModelRef, matcher: Matcher) -> str:
    """The report's `model`: the checkpoint file, else the architecture's name."""
    from mmcross.factory import resolve_checkpoint

    return str(resolve_checkpoint(ref.checkpoint)) if ref.checkpoint else matcher.cfg.name
