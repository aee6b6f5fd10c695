"""Decode once: the uint8 cache holds the eval-geometry pixels, is reused, rebuilt when its files change, records
rejects; tensor crops match torchvision's geometry; the epoch plan shows every caption; training reads the cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mmcross.data.decoded import DecodedImages, augment_batch
from mmcross.data.records import Record
from mmcross.data.word_drop import drop_words
from mmcross.train import EpochPlan, fit, known_matches
from tests.train_helpers import make_shapes, short_run


def _records(root: Path, n: int = 5, size=(40, 30)) -> list[Record]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = root / f"{i}.png"
        pixels = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (i + 1) % 251).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        out.append(Record(f"{i}.png", [f"caption {i}"], "train", path))
    return out


def test_cache_holds_eval_geometry_and_is_reused(tmp_path):
    records = _records(tmp_path / "img")
    first = DecodedImages.open_or_build(records, 16, tmp_path / "cache", dataset=str(tmp_path), split="train")
    assert first.built and first.pixels.shape == (5, 16, 16, 3) and first.ok.all() and not first.rejects
    for i, record in enumerate(records):
        image = Image.open(record.path).convert("RGB")
        expected = np.asarray(TF.center_crop(TF.resize(image, 16, InterpolationMode.BICUBIC), [16, 16]))
        assert np.array_equal(first.pixels[i], expected)
    again = DecodedImages.open_or_build(records, 16, tmp_path / "cache", dataset=str(tmp_path), split="train")
    assert not again.built and again.folder == first.folder and np.array_equal(again.pixels, first.pixels)
    other_size = DecodedImages.open_or_build(records, 12, tmp_path / "cache", dataset=str(tmp_path), split="train")
    assert other_size.built and other_size.folder != first.folder


def test_cache_is_rebuilt_when_a_file_changes_and_records_rejects(tmp_path):
    records = _records(tmp_path / "img")
    before = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    records[2].path.write_bytes(b"not an image at all")
    os.utime(records[2].path, ns=(1, 1))  # a new mtime even on a coarse clock
    after = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    assert after.built and after.folder != before.folder
    assert after.ok.tolist() == [True, True, False, True, True]
    assert [r.path for r in after.rejects] == [str(records[2].path)]
    reopened = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    assert not reopened.built and [r.reason for r in reopened.rejects] == [r.reason for r in after.rejects]


def test_a_killed_build_leaves_no_cache(tmp_path):
    records = _records(tmp_path / "img")
    first = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    (first.folder / "meta.json").unlink()  # as if killed after the array, before its meta.json
    rebuilt = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    assert rebuilt.built and np.array_equal(rebuilt.pixels, first.pixels)


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: os.truncate(folder / "pixels.u8", 1000),  # a short pixel file: was an mmap error
        lambda folder: os.truncate(folder / "pixels.u8", 5 * 16 * 16 * 3 + 1),  # a long one
        lambda folder: (folder / "meta.json").write_text('{"ident": '),  # was a JSONDecodeError
        lambda folder: (folder / "meta.json").write_text("[]"),
    ],
    ids=["short-pixels", "long-pixels", "cut-meta", "list-meta"],
)
def test_a_damaged_cache_is_rebuilt(tmp_path, caplog, damage):
    caplog.set_level(logging.WARNING, logger="mmcross.data.decoded")  # a CLI test before may have raised the level
    records = _records(tmp_path / "img")
    first = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    expected = np.array(first.pixels)
    del first.pixels  # unmapped before the file is cut
    damage(first.folder)
    rebuilt = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    assert rebuilt.built and rebuilt.folder == first.folder and np.array_equal(rebuilt.pixels, expected)
    assert f"decoded-image cache {first.folder} cannot be read" in caplog.text
    assert not DecodedImages.open_or_build(records, 16, tmp_path / "cache").built


def test_a_build_removes_the_files_of_killed_builds_and_not_of_live_ones(tmp_path):
    records = _records(tmp_path / "img")
    first = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    (first.folder / "meta.json").unlink()  # rebuilt below
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a PID with no process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = tmp_path / "cache" / "0123456789abcdef0123"  # another key's folder, never built again
    other.mkdir()
    try:
        left = [first.folder / f"pixels.u8.tmp{dead.pid}", first.folder / f"meta.json.tmp{dead.pid}"]
        left.append(other / f"pixels.u8.tmp{dead.pid}")
        running = [first.folder / f"pixels.u8.tmp{live.pid}", other / f"meta.json.tmp{live.pid}"]
        for path in left + running:
            path.write_bytes(b"\0" * 100)
        assert DecodedImages.open_or_build(records, 16, tmp_path / "cache").built
        assert not any(p.exists() for p in left) and all(p.exists() for p in running)
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("ours_taken", [False, True])
def test_two_builds_of_one_key_both_finish(tmp_path, monkeypatch, ours_taken):
    """Another process builds the same key while this build waits to rename its meta.json (`ours_taken`: and removes
    this build's temporary files, as it would a dead build's): both builds end with the cache."""
    records = _records(tmp_path / "img")
    replace, pid = Path.replace, os.getpid()

    def paused(self, target):
        if self.name.startswith("meta.json.tmp") and os.getpid() == pid:  # this build, between write and rename
            monkeypatch.setattr(os, "getpid", os.getppid)  # another process, as far as the files go
            other = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
            monkeypatch.setattr(os, "getpid", lambda: pid)
            assert other.built
            if ours_taken:
                for path in self.parent.glob("*.tmp*"):
                    path.unlink()
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", paused)
    ours = DecodedImages.open_or_build(records, 16, tmp_path / "cache")
    assert ours.built and ours.ok.all() and not list(ours.folder.glob("*.tmp*"))
    monkeypatch.setattr(Path, "replace", replace)
    assert not DecodedImages.open_or_build(records, 16, tmp_path / "cache").built


def test_whole_image_resize_is_an_area_average():
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    out = augment_batch(images, (4, 4), [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], min_scale=None)
    x = images.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out, F.interpolate(x, size=(4, 4), mode="area"), atol=1e-6)
    same = augment_batch(images, (8, 8), [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], min_scale=None)
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    assert torch.allclose(same, (x - mean) / std, atol=1e-5)


def test_random_crops_are_seeded_and_stay_inside():
    images = torch.zeros(16, 20, 20, 3, dtype=torch.uint8)
    images[:, :, :10] = 255  # left half white: a crop's mean tells where it lies
    crop = lambda seed: augment_batch(  # noqa: E731
        images, (8, 8), [0, 0, 0], [1, 1, 1], min_scale=0.3, generator=torch.Generator().manual_seed(seed)
    )
    a, b, c = crop(1), crop(1), crop(2)
    assert a.shape == (16, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert len({round(float(m), 3) for m in a.mean(dim=(1, 2, 3))}) > 1  # different crops per image


def test_mirrors_flip_about_half_of_the_crops_and_leave_the_crops_alone():
    images = torch.randint(0, 256, (64, 12, 12, 3), dtype=torch.uint8)
    crop = lambda hflip: augment_batch(  # noqa: E731
        images, (6, 6), [0, 0, 0], [1, 1, 1], min_scale=0.5, hflip=hflip, generator=torch.Generator().manual_seed(4)
    )
    plain, mirrored = crop(False), crop(True)
    flipped = [torch.equal(m, p.flip(-1)) and not torch.equal(m, p) for p, m in zip(plain, mirrored)]
    kept = [torch.equal(m, p) for p, m in zip(plain, mirrored)]
    assert all(f or k for f, k in zip(flipped, kept))  # each crop is the same crop, mirrored or not
    assert 16 < sum(flipped) < 48


def test_caption_word_drop_is_seeded_and_keeps_a_word():
    captions = ["a dog runs on the beach", "two children play in the snow", "dog", ""]
    draw = lambda seed, p: drop_words(captions, p, torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(0, 0.0) == captions and draw(1, 0.3) == draw(1, 0.3)
    dropped = draw(1, 0.3)
    for before, after in zip(captions[:2], dropped[:2]):
        words = before.split()
        assert 1 <= len(after.split()) <= len(words)
        it = iter(words)
        assert all(w in it for w in after.split())  # what stays keeps its order
    assert dropped[2:] == ["dog", ""]  # a one-word or empty caption is left as it is
    assert all(len(c.split()) == 1 for c in draw(2, 0.99)[:2])  # one word always stays
    many = [draw(s, 0.3) for s in range(20)]
    assert len({tuple(m) for m in many}) > 10  # different draws for different seeds


def test_an_epoch_shows_every_caption_once_with_distinct_images():
    counts = [5, 5, 5, 5, 5, 5, 5, 5]
    plan = EpochPlan(8, counts, batch=4, world_size=1, seed=3)
    assert plan.per_epoch == 5 * 2
    seen = []
    for m in range(plan.per_epoch):
        epoch, images, captions = plan.micro_batch(m, 0)
        assert epoch == 0 and len(set(images)) == len(images) == 4
        seen += list(zip(images, captions))
    assert sorted(seen) == [(i, c) for i in range(8) for c in range(5)]
    assert plan.micro_batch(plan.per_epoch, 0)[0] == 1
    assert plan.micro_batch(3, 0) == EpochPlan(8, counts, 4, 1, 3).micro_batch(3, 0)  # a function of its inputs


def test_fewer_captions_repeat_and_every_one_is_seen():
    plan = EpochPlan(6, [1, 2, 3, 3, 2, 1], batch=3, world_size=1, seed=0)
    seen: dict[int, set[int]] = {}
    for m in range(plan.per_epoch):
        _, images, captions = plan.micro_batch(m, 0)
        for i, c in zip(images, captions):
            seen.setdefault(i, set()).add(c)
    assert {i: len(c) for i, c in seen.items()} == {0: 1, 1: 2, 2: 3, 3: 3, 4: 2, 5: 1}


def test_several_captions_per_image_share_a_batch_and_an_epoch_still_shows_each_once():
    plan = EpochPlan(8, [5] * 8, batch=6, world_size=1, seed=3, captions_per_image=3)
    assert plan.rounds == 2 and plan.per_round == 4  # ceil(5 / 3) rounds of 8 // 2 batches of 2 images
    seen = []
    for m in range(plan.per_epoch):
        _, images, captions = plan.micro_batch(m, 0)
        assert len(images) == 6 and len(set(images)) == 2
        assert images[0] == images[1] == images[2] and images[3] == images[4] == images[5]  # consecutive rows
        assert len(set(captions[:3])) == 3  # three different captions of the first image
        seen += list(zip(images, captions))
    # 2 rounds x 3 captions = 6 per image: all 5 captions, one of them twice
    assert sorted(set(seen)) == [(i, c) for i in range(8) for c in range(5)] and len(seen) == 8 * 6
    with pytest.raises(ValueError, match="multiple of train.captions_per_image"):
        EpochPlan(8, [5] * 8, batch=5, world_size=1, seed=0, captions_per_image=2)


def test_nearest_images_match_a_brute_force_ranking_and_skip_unreadable_images():
    from mmcross.train.plan import nearest_images

    pooled = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    good = torch.ones(30, dtype=torch.bool)
    good[[4, 17]] = False  # unreadable: zero features in the cache, never a neighbour
    nearest = nearest_images(pooled, good, k=5, chunk=7)  # chunks of 7: the last one is short
    unit = pooled / pooled.norm(dim=1, keepdim=True)
    for i in range(30):
        order = sorted((j for j in range(30) if j != i and good[j]), key=lambda j: -float(unit[i] @ unit[j]))
        assert nearest[i].tolist() == order[:5], i


def test_neighbour_batches_hold_each_seed_with_its_nearest_and_every_image_seeds_once_an_epoch():
    from mmcross.train.plan import NeighbourPlan

    n, group = 24, 2
    nearest = torch.stack([torch.tensor([(i + d) % n for d in range(1, 7)]) for i in range(n)])  # (n, 6)
    counts = [1 + i % 5 for i in range(n)]
    plan = NeighbourPlan(nearest, counts, batch=6, world_size=1, seed=3, group=group)
    assert plan.per_epoch == n // 2  # two seeds per batch
    seeds = []
    for m in range(plan.per_epoch):
        epoch, images, captions = plan.micro_batch(m, 0)
        assert epoch == 0 and len(images) == len(captions) == 6
        for g in range(2):
            seed, *members = images[3 * g : 3 * g + 3]
            assert len(set(members)) == group and set(members) <= set(nearest[seed].tolist())
            seeds.append(seed)
        assert all(0 <= c < counts[i] for i, c in zip(images, captions))
    assert sorted(seeds) == list(range(n))
    assert plan.micro_batch(5, 0) == NeighbourPlan(nearest, counts, 6, 1, 3, group).micro_batch(5, 0)
    assert plan.micro_batch(5, 0) != plan.micro_batch(5 + plan.per_epoch, 0)  # a fresh draw each epoch
    # two ranks take different seeds of one global batch
    two = NeighbourPlan(nearest, counts, batch=6, world_size=2, seed=3, group=group)
    assert not {two.micro_batch(0, 0)[1][0], two.micro_batch(0, 0)[1][3]} & {
        two.micro_batch(0, 1)[1][0],
        two.micro_batch(0, 1)[1][3],
    }
    with pytest.raises(ValueError, match="neighbourhoods of 3"):
        NeighbourPlan(nearest, counts, batch=7, world_size=1, seed=0, group=group)


def test_one_tower_pass_per_image_gives_the_losses_of_repeated_images(tmp_path):
    """Rows sharing an image (`image_rows`) score as if the image had been encoded once per row; the ITM takes
    each image's first row."""
    from mmcross.factory import create_matcher
    from mmcross.losses import LossWeights, MatchingLoss
    from mmcross.train.loop import TrainModule

    torch.manual_seed(0)
    matcher = create_matcher("tiny", overrides={"fusion.dim": "32", "fusion.dim_head": "8"})
    module = TrainModule(matcher, MatchingLoss(LossWeights(1.0, 1.0, 0.5, 0.2, 0.5))).eval()
    pixels = torch.randn(3, 3, 64, 64)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    ids = matcher.tokenize(["a dog", "a brown dog", "a cat", "two cats", "a red bar", "one bar"])
    known = rows[:, None] == rows[None, :]
    torch.manual_seed(1)
    shared = module(pixels, ids, known=known, image_rows=rows)
    torch.manual_seed(1)
    image, text = matcher.encode_image(pixels[rows]), matcher.encode_text(ids)
    repeated = module.loss(matcher, image, text, known=known, itm_rows=torch.tensor([0, 2, 4]))  # ITM: first rows
    for key in ("loss", "itc", "itm", "vse"):
        assert float(shared[key].detach()) == pytest.approx(float(repeated[key].detach()), rel=1e-5, abs=1e-6), key


def test_training_with_several_captions_per_image(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", n_train=12, n_dev=2)  # 1 to 3 captions per image
    result = fit(_cfg(manifest, captions_per_image="2"), tmp_path / "run", progress=False)
    assert result.step == 3 and all(np.isfinite(e["loss"]) for e in result.losses)
    assert result.losses[0]["epoch"] == pytest.approx(1 / 12, abs=1e-4)  # 2 rounds of 6 batches of 2 images x 2
    with pytest.raises(ValueError, match="multiple of train.captions_per_image"):  # refused before anything is built
        fit(_cfg(manifest, captions_per_image="3"), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()


def test_the_same_image_is_never_a_negative():
    a = Record("a.jpg", ["a dog"], path=Path("/x/a.jpg"))
    again = Record("a.jpg#2", ["a brown dog runs"], path=Path("/x/a.jpg"))
    other = Record("b.jpg", ["a cat"], path=Path("/x/b.jpg"))
    known = known_matches([a, again, other], ["a dog", "a brown dog runs", "a cat"])
    assert known.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def _cfg(manifest: Path, **train) -> object:
    return short_run(manifest, {"train.batch_size": "4", "train.max_steps": "3"}, **train)


def test_cached_and_streamed_training_see_the_same_pixels(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", n_train=8, n_dev=2)  # 64 px images: the tiny model's input size
    # on the CPU, where two runs on the same pixels give the same losses: on a GPU (bf16 autocast by default, backward
    # kernels that add in any order) this comparison failed (an H200), and the pixels are what it is about
    same = {"augment": "false", "device": "cpu"}
    cached = fit(_cfg(manifest, **same), tmp_path / "cached", progress=False)
    streamed = fit(_cfg(manifest, **same, decode_cache="none"), tmp_path / "streamed", progress=False)
    for a, b in zip(cached.losses, streamed.losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)


def test_training_records_unreadable_images_and_goes_on(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", n_train=10, n_dev=2)
    (tmp_path / "shapes" / "images" / "003.png").write_bytes(b"\x89PNG broken")
    result = fit(_cfg(manifest), tmp_path / "run", progress=False)
    assert result.step == 3
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["path"].endswith("003.png")


def test_paraphrase_matches_equal_a_naive_loop():
    from mmcross.train.plan import paraphrase_matches

    torch.manual_seed(0)
    unit = F.normalize(torch.randn(20, 6), dim=-1)
    first, counts = torch.tensor([0, 3, 4, 9, 12]), torch.tensor([3, 1, 5, 3, 2])  # images' caption ranges
    cap = torch.tensor([1, 3, 7, 10, 13])  # one drawn caption per row
    got = paraphrase_matches(unit, first, counts, cap, 0.3)
    for i in range(5):
        for j in range(5):
            best = max(float(unit[c] @ unit[cap[j]]) for c in range(first[i], first[i] + counts[i]))
            assert bool(got[i, j]) == (best >= 0.3), (i, j)
    assert got.diagonal().all()  # a row's own caption is its own paraphrase


def test_paraphrases_are_no_negatives_in_feature_cache_batches(tmp_path):
    from mmcross.config import TrainCfg
    from mmcross.factory import create_matcher
    from mmcross.train.loop import check_cfg, read_records
    from mmcross.train.plan import BatchSource, paraphrase_matches

    manifest = make_shapes(tmp_path / "shapes", n_train=12, n_dev=2)
    sets = {"batch_size": "6", "trainable": "fusion", "feature_cache": "true", "itc_weight": "0"}
    run = short_run(manifest, **sets, paraphrase_cosine="0.9")
    records, _ = read_records(str(manifest), TrainCfg(), "train")
    matcher = create_matcher("tiny")
    source = BatchSource(matcher, records, run.train, 0, 1, {}, {})
    batch = next(source.batches(0, 1))
    plain = BatchSource(matcher, records, short_run(manifest, **sets).train, 0, 1, {}, {})
    before = next(plain.batches(0, 1)).known  # the same rows and captions: the plan does not depend on the option
    cache = source.cache
    _, images, captions = source.plan.micro_batch(0, 0)
    idx = torch.tensor(images)
    cap = cache.first_caption[idx] + torch.tensor(captions)
    counts = torch.tensor([len(records[i].captions) for i in images])
    unit = F.normalize(cache.texts.pooled.float(), dim=-1)
    near = paraphrase_matches(unit, cache.first_caption[idx], counts, cap, 0.9)
    assert torch.equal(batch.known, before | near)
    assert (near & ~before).any()  # random-init towers: captions of other images do pass 0.9 here
    for value, message in (("1.5", r"paraphrase_cosine is a cosine in \[0, 1\]"), ("0.5", "needs train.fusion_steps")):
        with pytest.raises(ValueError, match=message):
            check_cfg(short_run(manifest, paraphrase_cosine=value).train)
    for fields, message in (
        ({"paraphrase_share": "1.0"}, r"paraphrase_share is a share of pairs in \[0, 1\)"),
        ({"paraphrase_share": "0.1"}, "paraphrase_share compares captions' embeddings in the feature cache"),
        ({**sets, "paraphrase_share": "0.1", "paraphrase_cosine": "0.5"}, "not both"),
    ):
        with pytest.raises(ValueError, match=message):
            check_cfg(short_run(manifest, **fields).train)


def test_paraphrase_share_sets_the_cosine_that_marks_that_share_of_the_batches_pairs(tmp_path):
    """`train.paraphrase_share`: the cosine is the (1 - share) quantile of the (image, another image's caption)
    cosines in the run's first 32 batches, computed here by loops, and the mask then uses it; the log says which."""
    from mmcross.config import TrainCfg
    from mmcross.factory import create_matcher
    from mmcross.train.loop import read_records
    from mmcross.train.plan import BatchSource, paraphrase_matches

    manifest = make_shapes(tmp_path / "shapes", n_train=12, n_dev=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:  # a caption every image repeats: those pairs are known matches already, left out of the share
        row["captions"].append("a picture")
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sets = {"batch_size": "6", "trainable": "fusion", "feature_cache": "true", "itc_weight": "0"}
    records, _ = read_records(str(manifest), TrainCfg(), "train")
    matcher = create_matcher("tiny")
    source = BatchSource(matcher, records, short_run(manifest, **sets, paraphrase_share="0.2").train, 0, 1, {}, {})
    cache = source.cache
    unit = F.normalize(cache.texts.pooled.float(), dim=-1)
    pairs, repeats = [], 0
    for m in range(32):
        _, images, captions = source.plan.micro_batch(m, 0)
        drawn = [int(cache.first_caption[j]) + c for j, c in zip(images, captions)]
        for a, i in enumerate(images):
            own = range(int(cache.first_caption[i]), int(cache.first_caption[i]) + len(records[i].captions))
            for b, j in enumerate(images):
                if j == i:
                    continue
                if cache.captions[drawn[b]] in records[i].captions:
                    repeats += 1  # word for word one of image i's own
                    continue
                pairs.append(max(float(unit[o] @ unit[drawn[b]]) for o in own))
    assert repeats > 0.2 * (repeats + len(pairs))  # more than the share: with them, the cosine would be 1
    expected = float(np.quantile(pairs, 0.8))
    assert source.paraphrase_cosine == pytest.approx(expected, abs=1e-5) and source.paraphrase_cosine < 0.999
    assert 0.15 <= np.mean(np.array(pairs) >= source.paraphrase_cosine) <= 0.25
    plain = BatchSource(matcher, records, short_run(manifest, **sets).train, 0, 1, {}, {})
    _, images, captions = source.plan.micro_batch(0, 0)
    idx = torch.tensor(images)
    counts = torch.tensor([len(records[i].captions) for i in images])
    near = paraphrase_matches(
        unit, cache.first_caption[idx], counts, cache.first_caption[idx] + torch.tensor(captions), expected
    )
    assert torch.equal(next(source.batches(0, 1)).known, next(plain.batches(0, 1)).known | near)

    run = fit(short_run(manifest, **sets, paraphrase_share="0.2", max_steps="2"), tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (run.run_dir / "log.jsonl").read_text().splitlines()]
    chosen = [x for x in lines if "paraphrase_share" in x]
    assert chosen == [{"step": 0, "paraphrase_share": 0.2, "paraphrase_cosine": source.paraphrase_cosine}]
    longer = short_run(manifest, **sets, paraphrase_share="0.2", max_steps="4")
    fit(longer, run.run_dir, resume=True, progress=False, deliberate={"max_steps"})  # the source is built again
    lines = [json.loads(x) for x in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "paraphrase_share" in x] == [0]  # once, where the phase starts
