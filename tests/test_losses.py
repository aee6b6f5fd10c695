"""Losses against naive references: InfoNCE, hard-negative sampling, VSE++ max-violation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcross.losses import ContrastiveLoss, sample_hard_negatives, vse_max_violation


def _unit(b, e, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, e, generator=g), dim=-1)


def test_itc_matches_naive_cross_entropy_and_learns_temperature():
    image, text = _unit(6, 8, 0), _unit(6, 8, 1)
    loss_fn = ContrastiveLoss(init_temperature=0.1)
    loss = loss_fn(image, text)
    sim = image @ text.T * 10.0
    naive = 0.0
    for i in range(6):
        naive += -math.log(math.exp(sim[i, i]) / sim[i].exp().sum())
        naive += -math.log(math.exp(sim[i, i]) / sim[:, i].exp().sum())
    assert abs(float(loss) - naive / 12) < 1e-4
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad != 0


def test_hard_negatives_never_the_positive_and_follow_similarity():
    torch.manual_seed(0)
    b = 5
    sim = torch.full((b, b), -50.0)
    sim.fill_diagonal_(50.0)
    hard = {(i, (i + 2) % b) for i in range(b)}
    for i, j in hard:
        sim[i, j] = 40.0  # the only plausible negative of image i / caption j
    for _ in range(20):
        neg_text, neg_image = sample_hard_negatives(sim)
        assert all(neg_text[i] != i and neg_image[i] != i for i in range(b))
        assert {(i, int(neg_text[i])) for i in range(b)} == hard
        assert {(int(neg_image[j]), j) for j in range(b)} == hard


def test_vse_max_violation_matches_naive_loop():
    image, text = _unit(5, 8, 2), _unit(5, 8, 3)
    margin = 0.2
    sim = image @ text.T
    naive = 0.0
    for i in range(5):
        naive += max([max(0.0, margin + sim[i, j] - sim[i, i]) for j in range(5) if j != i])
        naive += max([max(0.0, margin + sim[j, i] - sim[i, i]) for j in range(5) if j != i])
    assert abs(float(vse_max_violation(image, text, margin)) - naive / 5) < 1e-5
