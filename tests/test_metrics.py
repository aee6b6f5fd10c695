"""Recall@K and ranks against a naive loop, with images of 1, 3 and 7 captions (never assume five)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmcross.metrics import median_rank, retrieval_metrics


def naive_metrics(sim: list[list[float]], caption_image: list[int], ks=(1, 5, 10), matches=None) -> dict[str, float]:
    n_images, n_captions = len(sim), len(sim[0])
    if matches is None:
        matches = [[caption_image[c] == i for c in range(n_captions)] for i in range(n_images)]
    t2i = []
    for c in range(n_captions):
        described = [i for i in range(n_images) if matches[i][c]]
        true = max(sim[i][c] for i in described)  # the best-ranked image the caption describes counts
        rank = 1 + sum(1 for i in range(n_images) if i not in described and sim[i][c] >= true)
        t2i.append(rank)
    i2t = []
    for i in range(n_images):
        own = [c for c in range(n_captions) if matches[i][c]]
        if not own:
            continue
        ranks = []
        for c in own:
            beaten_by_wrong = sum(1 for o in range(n_captions) if o not in own and sim[i][o] >= sim[i][c])
            beaten_by_own = sum(1 for o in own if o != c and sim[i][o] > sim[i][c])
            ranks.append(1 + beaten_by_wrong + beaten_by_own)
        i2t.append(min(ranks))
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r <= k for r in t2i) / len(t2i)
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = sum(r <= k for r in i2t) / len(i2t)
    out["image_retrieval_median_rank"] = math.floor(statistics.median(t2i))
    out["text_retrieval_median_rank"] = math.floor(statistics.median(i2t))
    out["rsum"] = 100 * sum(v for key, v in out.items() if "recall@" in key)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantise", [False, True])  # quantised scores create many ties
def test_metrics_equal_naive_loop(seed, quantise):
    generator = torch.Generator().manual_seed(seed)
    captions_per_image = [1, 3, 7, 1, 3, 7, 2, 5, 0, 4, 1, 3]  # one image without captions
    caption_image = torch.tensor([i for i, n in enumerate(captions_per_image) for _ in range(n)])
    sim = torch.randn(len(captions_per_image), len(caption_image), generator=generator)
    sim[caption_image, torch.arange(len(caption_image))] += 1.0  # some signal
    if quantise:
        sim = sim.round()
    ours = retrieval_metrics(sim, caption_image, ks=(1, 5, 10))
    expected = naive_metrics(sim.tolist(), caption_image.tolist())
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key] == pytest.approx(expected[key]), key


def test_perfect_and_constant_scores():
    caption_image = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2])
    perfect = (caption_image[None, :] == torch.arange(3)[:, None]).float()
    metrics = retrieval_metrics(perfect, caption_image)
    assert metrics["image_retrieval_recall@1"] == 1.0 and metrics["text_retrieval_recall@1"] == 1.0
    constant = retrieval_metrics(torch.zeros(3, len(caption_image)), caption_image)
    assert constant["image_retrieval_recall@1"] == 0.0 and constant["text_retrieval_recall@1"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_repeated_captions_describe_every_image_they_are_written_for(seed):
    """A caption written word for word under several images matches all of them (`matches`), against the naive loop."""
    from mmcross.evaluate import same_text_matches

    generator = torch.Generator().manual_seed(seed)
    captions = ["a red square", "A red square.", "a dog", "a blue circle", "a red square", "a cat", "a dog", "a cow"]
    caption_image = torch.tensor([0, 1, 1, 2, 3, 3, 4, 4])
    matches = same_text_matches(captions, caption_image, 6)  # image 5 has no caption
    assert matches[:, 0].tolist() == [True, True, False, True, False, False]  # "a red square" under 0, 1 and 3
    assert matches[:, 2].tolist() == [False, True, False, False, True, False]  # "a dog" under 1 and 4
    assert matches[:, 7].tolist() == [False, False, False, False, True, False]
    sim = torch.randn(6, len(captions), generator=generator).round()  # ties too
    ours = retrieval_metrics(sim, caption_image, matches=matches)
    expected = naive_metrics(sim.tolist(), caption_image.tolist(), matches=matches.tolist())
    for key in expected:
        assert ours[key] == pytest.approx(expected[key]), key
    # identical captions score identically: by index alone, one copy always loses the tie; by text, none does
    same = torch.zeros(6, len(captions))
    same[caption_image, torch.arange(len(captions))] = 1.0
    same[:, 1] = same[:, 0] = same[:, 4] = torch.tensor([1.0, 1.0, 0, 1.0, 0, 0])
    assert retrieval_metrics(same, caption_image, matches=matches)["text_retrieval_recall@1"] == 1.0
    assert retrieval_metrics(same, caption_image)["text_retrieval_recall@1"] < 1.0


def test_sign_test_against_the_binomial_by_hand():
    from math import comb

    from mmcross.metrics import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * (comb(10, 0) + comb(10, 1)) / 2**10)
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(246, 184) < 0.01  # last session's Flickr8k re-rank: p ~ 0.003


def test_rank_changes_counts_each_query_once():
    from mmcross.metrics import rank_changes

    before = torch.tensor([1, 3, 5, 2, 0, 7])
    after = torch.tensor([1, 1, 6, 2, 0, 2])  # same, up, down, same, (no match), up
    assert rank_changes(before, after) == {"up": 2, "down": 1, "same": 2, "sign_test_p": pytest.approx(1.0)}


def test_median_rank_of_an_even_count_is_the_mean_of_the_middle_two_rounded_down():
    # VSE++ / SCAN: floor(np.median(ranks)); the lower middle rank (torch.median) reported 11 here
    assert median_rank(torch.tensor([40, 11, 3, 19])) == 15.0
    assert median_rank(torch.tensor([40, 11, 3, 20])) == 15.0  # 15.5 rounded down
    assert median_rank(torch.tensor([7, 1, 3])) == 3.0
    assert median_rank(torch.tensor([5])) == 5.0
