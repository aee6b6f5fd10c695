"""Datasets: readers (one small module per format), safe image loading, and loaders.

- `records`: the `Record` every reader yields (image id, path or bytes, captions, split), `Reject`, `ReadStats`.
- `registry`: `open_dataset(path, DataCfg)` picks a reader (`--format`, or `auto` detection).
- readers: `flickr`, `karpathy`, `coco`, `table` (CSV/TSV/JSONL/Parquet), `folder` (sidecar .txt), `wds` (shards).
- `images`: `decode` / `try_decode` / `load_rgb`: any file to RGB, or a reject with a reason.
- `loader`: `image_loader(records, transform)`: batches of pixels with rejects beside them, for `index` and `train`.
- `validate`, `convert`: the `mmcross data` commands. `synth`: the compositional synthetic set.
"""
