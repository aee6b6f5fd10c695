"""The fusion phase (`train.fusion_steps`): after the towers' steps, the fusion and match head train alone.

Why a phase of its own: during the towers' steps the fusion sees cropped, mirrored, word-dropped views of images
whose embeddings are still moving, and a from-scratch Flickr8k run's head learned little there that carried to dev
(re-ranked rsum 104.3 vs dual 106.2). With the towers frozen, every training image (eval transform) and caption is
encoded once (the feature cache) and the fusion trains on the clean features the re-ranker will see, at a fraction
of a tower step's cost. Steps keep counting from `max_steps`; the phase has its own optimiser, warm-up and cosine.
"""

from __future__ import annotations

import dataclasses

from mmcross.config import TrainCfg
from mmcross.train.optim import optimizer_and_schedule, set_trainable


def fusion_phase_cfg(cfg: TrainCfg) -> TrainCfg:
    """The settings the fusion phase trains with: frozen encoders on the feature cache, the ITM alone, its own
    batch, learning rate and schedule (`max_steps` = `fusion_steps`), one caption per image per batch."""
    return dataclasses.replace(
        cfg,
        trainable="fusion",
        feature_cache=True,
        augment=False,
        caption_word_drop=0.0,
        batch_size=cfg.fusion_batch_size,
        captions_per_image=1,
        accum_steps=1,
        max_steps=cfg.fusion_steps,
        lr=cfg.fusion_lr if cfg.fusion_lr is not None else cfg.lr,
        encoder_lr=None,
        warmup_steps=min(cfg.fusion_warmup_steps, cfg.fusion_steps),
        itc_weight=0.0,  # frozen towers: the ITC could only move the temperature, which draws the hard negatives
        vse_weight=0.0,
        itm_start=0.0,
        fusion_steps=0,
    )


def enter_fusion_phase(r) -> None:
    """Switch a `mmcross.train.loop.Run` to the fusion phase: freeze the encoders and the temperature, the ITM
    alone, a fresh optimiser and schedule over what still trains (under torchrun, a fresh DDP wrapper)."""
    cfg = fusion_phase_cfg(r.cfg)
    set_trainable(r.matcher, "fusion")
    r.loss.itc.logit_scale.requires_grad_(False)
    r.loss.weights = dataclasses.replace(r.loss.weights, itc=0.0, vse=0.0)
    r.optimizer, r.scheduler = optimizer_and_schedule(r.module, cfg)
    if r.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        r.model = None  # the towers' wrapper goes first: its reducer's gradient hooks go with it
        device = r.device
        ids = [device] if device.type == "cuda" else None
        # find_unused_parameters: a fusion variant may hold weights a given score rule leaves unused
        r.model = DistributedDataParallel(r.module, device_ids=ids, find_unused_parameters=True)
    r.phase_start, r.cfg = r.cfg.max_steps, cfg  # steps count on from the towers' last
    r.head_learns = cfg.itm_weight > 0
