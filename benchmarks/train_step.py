"""Where a training step's time goes: data, image tower, text tower, losses (ITC + ITM forward), backward, optimiser.

Usage: python -m benchmarks.train_step PRESET BATCH THREADS cache|jpeg [noitm]

`cache` reads the decoded-image cache and crops on tensors (as `train.decode_cache` does); `jpeg` decodes and
transforms each image with PIL in this process (the streaming path with `workers: 0`). Six timed steps after one
warm-up step, on the Flickr8k train images in ../shared; prints one JSON line.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from benchmarks.common import FLICKR8K
from mmcross.config import DataCfg
from mmcross.data.decoded import DecodedImages, augment_batch, default_cache_dir
from mmcross.data.loader import collate, load_item
from mmcross.data.registry import open_dataset
from mmcross.factory import create_matcher
from mmcross.losses import LossWeights, MatchingLoss
from mmcross.train.plan import normalisation

STEPS = 6


def main(preset: str, batch: int, threads: int, data: str, itm: bool = True) -> dict:
    torch.set_num_threads(threads)
    matcher = create_matcher(preset, overrides={"fusion.variant": "text_to_image", "fusion.dropout": 0.1}).train()
    loss = MatchingLoss(LossWeights(1.0, 1.0 if itm else 0.0, 0.0, 0.2, 0.5))
    opt = torch.optim.AdamW([*matcher.parameters(), *loss.parameters()], lr=1e-4, fused=True)
    records = [r for r in open_dataset(str(FLICKR8K), DataCfg(format="flickr", split="train")).records() if r.captions]
    h, w = matcher.image_encoder.image_size
    mean, std = normalisation(matcher.image_encoder.preprocess)
    side = math.ceil(max(h, w) * 1.15 / 8) * 8
    cache = None
    if data == "cache":
        cache = DecodedImages.open_or_build(records, side, default_cache_dir(), dataset=str(FLICKR8K), split="train")
    seconds: dict[str, float] = {}

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    def pixels(index):
        if cache is not None:
            return augment_batch(cache.batch(index), (h, w), mean, std, min_scale=0.5)
        transform = matcher.image_encoder.preprocess_train
        return collate([load_item(i, records[i], transform, DataCfg(), (w, h)) for i in index]).pixels

    for step in range(STEPS + 1):
        if step == 1:
            seconds.clear()  # the first step warms up oneDNN
        index = list(range(step * batch, (step + 1) * batch))
        px = clock("data", lambda: pixels(index))
        ids = matcher.tokenize([records[i].captions[0] for i in index])
        image = clock("image fwd", lambda: matcher.encode_image(px))
        text = clock("text fwd", lambda: matcher.encode_text(ids))
        out = clock("losses fwd", lambda: loss(matcher, image, text))
        clock("backward", lambda: out["loss"].backward())
        clock("optimiser", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    total = sum(seconds.values())
    return {
        "preset": preset,
        "batch": batch,
        "threads": threads,
        "data": data,
        "itm": itm,
        "s_per_step": round(total / STEPS, 3),
        "samples_per_s": round(batch * STEPS / total, 1),
        "share": {k: round(v / total, 3) for k, v in seconds.items()},
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    print(
        json.dumps(main(args[0], int(args[1]), int(args[2]), args[3], itm=not (len(args) > 4 and args[4] == "noitm")))
    )
