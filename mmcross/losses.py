"""Training losses: ITC (InfoNCE with a learnable temperature), ITM with hard negatives, VSE++ max-violation.

Shapes: B images of the local batch, each paired with one caption (image i <-> caption i, distinct images);
G = the sum of every process's B, the batch gathered from all of them (ranks' B can differ); E embedding size.

- ITC (CLIP, ALBEF): cross-entropy both ways over cosine similarities scaled by exp(logit_scale). Under DDP each
  process gathers the embeddings of all processes with gradients, so every negative counts and gradients flow back to
  the process that computed them (open_clip's `gather_with_grad`).
- ITM (ALBEF, BLIP): the fusion head sees the B positive pairs, plus for every image one caption and for every
  caption one image drawn from the batch with probability softmax(ITC similarity) (the true partner excluded): hard
  negatives. Binary cross-entropy on the head's logit (1 = match).
- Known positives: a caption can be true of more than one image of a batch (COCO repeats captions word for word; the
  synthetic set's "a red square" fits every scene with a red square). `known` (B, B), True where caption j is one
  of image i's own captions, takes such pairs out of ITC's negatives and out of the ITM's negative draw: otherwise the
  hard-negative sampler, which prefers captions that fit the image, would label exactly those pairs "no match".
- VSE++ (Faghri et al.; MMCA): hinge on the hardest in-batch negative of each image and of each caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcross.dist import row_counts, world
from mmcross.features import ImageFeatures, TextFeatures


def gather_with_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """(B_r, ...) on each process r -> (sum of B_r, ...) in rank order; gradients flow back to each rank's rows.

    `counts`: every rank's B_r (`mmcross.dist.row_counts`), all-gathered here when None. Ranks' batches can differ
    in size (rows dropped while streaming): each is padded to the largest for the collective and cut back after.
    """
    _, size = world()
    if size == 1:
        return x
    counts = row_counts(x.shape[0], x.device) if counts is None else counts
    most = max(counts)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    parts = _AllGather.apply(x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


class _AllGather(torch.autograd.Function):
    """Every rank's tensor (one shape on all), in rank order; backward, each rank gets the sum over ranks of the
    gradient of its own part. What `torch.distributed.nn.all_gather` did; torch 2.14 deprecates that, pointing to
    a private module, so these few lines stand in (gloo and NCCL both all-reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = torch.stack(grads).contiguous()  # (world, ...): this rank's gradient of every rank's part
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with a learnable temperature, stored as `logit_scale` = log(1 / T) (CLIP's form).

    Args:
        init_temperature: starting T.
        max_scale: exp(logit_scale) is clamped to this (T >= 1 / max_scale), as CLIP does.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of B aligned L2-normalised embeddings (B, E) per process, negatives from every process.

        `known` (B, B): True where local caption j also describes local image i (off the diagonal); those pairs are
        left out of the negatives. Other processes' captions are not checked.
        """
        rank, _ = world()
        b = image.shape[0]
        counts = row_counts(b, image.device)  # every rank's B, in rank order
        start = sum(counts[:rank])  # this rank's first row in the gathered batch
        all_image, all_text = gather_with_grad(image, counts), gather_with_grad(text, counts)  # (G, E)
        scale = self.scale()
        logits_i2t = scale * image @ all_text.T  # (B, G)
        logits_t2i = scale * text @ all_image.T  # (B, G)
        if known is not None:
            known = _off_diagonal(known.to(image.device))
            for_images, for_texts = (
                torch.zeros_like(logits_i2t, dtype=torch.bool),
                torch.zeros_like(logits_i2t, dtype=torch.bool),
            )  # (B, G)
            for_images[:, start : start + b] = known  # image i, caption j
            for_texts[:, start : start + b] = known.T  # caption j, image i
            logits_i2t = logits_i2t.masked_fill(for_images, float("-inf"))
            logits_t2i = logits_t2i.masked_fill(for_texts, float("-inf"))
        labels = torch.arange(b, device=image.device) + start  # (B,)
        return (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2


def _off_diagonal(known: torch.Tensor) -> torch.Tensor:
    return known & ~torch.eye(known.shape[0], dtype=torch.bool, device=known.device)


def sample_hard_negatives(
    similarity: torch.Tensor,
    generator: torch.Generator | None = None,
    known: torch.Tensor | None = None,
    uniform: float = 0.0,
) -> tuple:
    """For each image a negative caption and for each caption a negative image, drawn by softmax(similarity).

    Args:
        similarity: (B, B) image x caption logits of the local batch (diagonal = positives).
        generator: random source; None = torch's global RNG.
        known: (B, B) bool, True where caption j is known to describe image i too; never drawn.
        uniform: draw from (1 - uniform) * softmax + uniform * the uniform distribution over allowed items: easy
            negatives beside the hard ones, for a fusion trained from scratch beside an ITC that is no better.

    Returns:
        (negative caption per image (B,), negative image per caption (B,)), indices into the batch; -1 where every
        other item of the batch is known to match.
    """
    with torch.no_grad():
        sim = similarity.float()
        allowed = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)  # never the positive
        if known is not None:
            allowed &= ~known.to(allowed.device)
        picks = []
        for weights, ok in ((F.softmax(sim, dim=1), allowed), (F.softmax(sim.T, dim=1), allowed.T)):
            weights = weights.masked_fill(~ok, 0) + 1e-12 * ok  # (B, B), zero exactly where not allowed
            has_any = ok.any(dim=1)  # (B,)
            if uniform > 0:
                flat = ok.float() / ok.sum(dim=1, keepdim=True).clamp_min(1)  # (B, B)
                weights = (1 - uniform) * weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30) + uniform * flat
            pick = torch.multinomial(weights + (~has_any)[:, None].float(), 1, generator=generator).squeeze(1)
            picks.append(pick.masked_fill(~has_any, -1))  # (B,)
    return picks[0], picks[1]


def itm_loss(
    matcher,
    image: ImageFeatures,
    text: TextFeatures,
    similarity: torch.Tensor,
    pairs: tuple[torch.Tensor, TextFeatures, torch.Tensor] | None = None,
    known: torch.Tensor | None = None,
    uniform: float = 0.0,
    rank_weight: float = 0.0,
) -> torch.Tensor:
    """BCE of the match head on B positives and 2B hard negatives (see `sample_hard_negatives`), plus
    `rank_weight` x a pairwise ranking term: softplus(negative logit - its anchor's positive logit), averaged, for
    each drawn negative (an image's negative caption against that image's own caption; a caption's negative image
    against its own image). Re-ranking orders one query's candidates: the BCE also spends itself on how matchable a
    caption or an image is in general, which changes no order; the ranking term is only the order (RankNet).

    Args:
        matcher: a `mmcross.model.Matcher` (its `score_pairs` runs fusion + head on aligned pairs).
        image: encoder outputs of the B images.
        text: encoder outputs of the B captions (caption i describes image i).
        similarity: (B, B) ITC logits used to draw the negatives.
        pairs: more labelled pairs from the dataset, (rows (N,), captions, labels (N,)): caption j is scored with
            image rows[j] and labelled labels[j] (1 = true). `fit` passes every other caption of each image as a
            positive and each caption's own hard negative (the attribute-swapped captions of `mmcross data synth`)
            as a negative; both enter the same BCE.
        known: (B, B) bool, True where caption j also describes image i: never drawn as a negative.
        uniform: share of negatives drawn uniformly rather than by similarity (`sample_hard_negatives`).
        rank_weight: weight of the pairwise ranking term (0 = BCE only).
    """
    b = similarity.shape[0]
    if b < 2:
        raise ValueError("ITM hard negatives need at least 2 images per batch")
    neg_text, neg_image = sample_hard_negatives(similarity, known=known, uniform=uniform)
    rows = torch.arange(b, device=neg_text.device)
    has_text, has_image = neg_text >= 0, neg_image >= 0  # (B,) a negative could be drawn
    # positives, image + negative caption, negative image + caption
    image_idx = torch.cat([rows, rows[has_text], neg_image[has_image]])
    text_idx = torch.cat([rows, neg_text[has_text], rows[has_image]])
    # the per-image and per-caption fusion work (self-attention, image keys/values) once per item, not per pair:
    # every item appears in about three pairs
    image, text = matcher.prepare(image), matcher.prepare(text)
    logits = matcher.score_pairs(image.select(image_idx), text.select(text_idx)).itm_logit.float()
    labels = torch.cat([torch.ones(b), torch.zeros(len(image_idx) - b)]).to(logits.device)
    rank = None
    if rank_weight:
        anchors = torch.cat([rows[has_text], rows[has_image]])  # (2B,) the positive pair of each negative's anchor
        rank = F.softplus(logits[b:] - logits[anchors]).mean()
    if pairs is not None and len(pairs[0]):
        pair_rows, pair_text, pair_labels = pairs
        extra = matcher.score_pairs(image.select(pair_rows), pair_text).itm_logit
        logits = torch.cat([logits, extra.float()])
        labels = torch.cat([labels, pair_labels.to(labels)])
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    return bce if rank is None else bce + rank_weight * rank


def vse_max_violation(
    image: torch.Tensor, text: torch.Tensor, margin: float = 0.2, known: torch.Tensor | None = None
) -> torch.Tensor:
    """VSE++ triplet loss with the hardest in-batch negatives, for aligned L2-normalised (B, E) embeddings.

    `known` (B, B): True where caption j also describes image i; such pairs are not negatives.
    """
    sim = image.float() @ text.float().T  # (B, B)
    pos = sim.diag()  # (B,)
    skip = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if known is not None:
        skip = skip | known.to(skip.device)
    cost_text = (margin + sim - pos[:, None]).clamp(min=0).masked_fill(skip, 0)  # image i vs caption j
    cost_image = (margin + sim - pos[None, :]).clamp(min=0).masked_fill(skip, 0)  # caption j vs image i
    return (cost_text.max(dim=1).values + cost_image.max(dim=0).values).mean()


@dataclass
class LossWeights:
    itc: float = 1.0  # InfoNCE
    itm: float = 1.0  # ITM with hard negatives
    vse: float = 0.0  # VSE++ max-violation
    vse_margin: float = 0.2  # VSE++ margin
    itm_uniform: float = 0.0  # share of ITM negatives drawn uniformly instead of by ITC similarity
    itm_detach: bool = False  # ITM trains the fusion and head only: the encoders get no gradient from it
    itm_rank: float = 0.0  # weight of the ITM's pairwise ranking term (`itm_loss`)


class MatchingLoss(nn.Module):
    """The weighted sum of the three losses on one batch of encoder outputs; owns the ITC temperature.

    `forward` returns a dict: `loss` (the weighted sum, to backpropagate) and each term that is on (detached).
    """

    def __init__(self, weights: LossWeights, init_temperature: float = 0.07):
        super().__init__()
        self.weights = weights
        self.itc = ContrastiveLoss(init_temperature)

    def forward(
        self,
        matcher,
        image: ImageFeatures,
        text: TextFeatures,
        pairs: tuple[torch.Tensor, TextFeatures, torch.Tensor] | None = None,
        known: torch.Tensor | None = None,
        itm_rows: torch.Tensor | None = None,
        itm: bool = True,
    ) -> dict[str, torch.Tensor]:
        """`known` (B, B): True where caption j is one of image i's captions too (see the module docstring);
        `itm_rows` (R,): the rows the ITM draws its pairs from (None: all; `pairs` then not supported); `itm`
        False: leave the ITM out of this batch (`train.itm_start`)."""
        w = self.weights
        image_emb, text_emb = image.pooled, text.pooled  # (B, E) unit vectors (`Matcher.encode_*`)
        terms: dict[str, torch.Tensor] = {}
        if w.itc:
            terms["itc"] = self.itc(image_emb, text_emb, known)
        if w.itm and itm:
            similarity = self.itc.scale().detach() * image_emb @ text_emb.T
            itm_image, itm_text, itm_known = image, text, known
            if itm_rows is not None:  # e.g. one caption per image when a batch holds several of each
                if pairs is not None:
                    raise ValueError("labelled ITM pairs need every row in the ITM")
                itm_image, itm_text = image.select(itm_rows), text.select(itm_rows)
                similarity = similarity[itm_rows][:, itm_rows]  # (R, R)
                itm_known = None if known is None else known[itm_rows][:, itm_rows]
            if w.itm_detach:
                itm_image, itm_text = itm_image.detached(), itm_text.detached()
                if pairs is not None:
                    pairs = (pairs[0], pairs[1].detached(), pairs[2])
            terms["itm"] = itm_loss(
                matcher, itm_image, itm_text, similarity, pairs, itm_known, w.itm_uniform, w.itm_rank
            )
        if w.vse:
            terms["vse"] = vse_max_violation(image_emb, text_emb, w.vse_margin, known)
        total = sum(getattr(w, name) * value for name, value in terms.items())
        return {"loss": total, **{name: value.detach() for name, value in terms.items()}}
