"""Image loading: decoded + transformed images per second through `image_loader`, with 0, 1 and 2 workers.

Input: the 100 full-size photos of ../shared/data/flickr8k/originals (about 500x375 JPEGs), read PASSES times;
transform: ViT-B-32's open_clip evaluation preprocess (resize to 224, centre crop, normalise). Worker start-up is
included, as a job pays it; each figure is the best of REPEATS runs. (Reduced-scale JPEG decoding, `draft_size`,
cannot help here: these photos are less than twice the 224-pixel input.)
"""

from __future__ import annotations

import time

from benchmarks.common import FLICKR8K
from mmcross.config import EncoderCfg
from mmcross.data.loader import image_loader
from mmcross.data.records import Record
from mmcross.encoders import load_encoders

PASSES = 5
BATCH_SIZE = 32
REPEATS = 3


def _images_per_s(records: list[Record], transform, workers: int) -> float:
    start = time.perf_counter()
    loaded = 0
    for batch in image_loader(records, transform, batch_size=BATCH_SIZE, workers=workers):
        loaded += len(batch.indices)
    seconds = time.perf_counter() - start
    if loaded != len(records):
        raise RuntimeError(f"loaded {loaded} of {len(records)} images")
    return loaded / seconds


def run() -> dict[str, float]:
    paths = sorted((FLICKR8K / "originals").glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no photos in {FLICKR8K / 'originals'}")
    records = [Record(p.name, [], path=p) for p in paths] * PASSES
    encoders = load_encoders(EncoderCfg(model_name="ViT-B-32"))
    transform = encoders.image.preprocess
    results: dict[str, float] = {"loader.images": len(records), "loader.batch_size": BATCH_SIZE}
    _images_per_s(records[:BATCH_SIZE], transform, 0)  # warm the page cache
    for workers in (0, 1, 2):
        best = max(_images_per_s(records, transform, workers) for _ in range(REPEATS))
        results[f"loader.images_per_s_workers{workers}"] = best
    return results
