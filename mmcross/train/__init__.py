"""Training: `fit()` fine-tunes a matcher with ITC + ITM (hard negatives) [+ VSE++], and the run directory it writes.

A run directory holds:

    config.json          the resolved `RunCfg` (after YAML and `--set`)
    loss.png             the loss curve of log.jsonl (`train_from_config`)
    log.jsonl            one line per `log_every` steps: step, epoch, loss and each term, lr, temperature,
                         samples/s, elapsed seconds; one line per dev evaluation ({"step", "eval": {...}}); the
                         cosine `paraphrase_share` chose ({"step", "paraphrase_share", "paraphrase_cosine"}); a last
                         line with the steps done and `stopped_by`
    last.safetensors     the matcher at the latest checkpoint (`mmcross.factory` format, `step` in its metadata)
    best.safetensors     the matcher with the best dev rsum (re-ranked when `eval_rerank_k` > 0)
    state.safetensors    optimiser tensors, the ITC temperature and RNG states (no pickle anywhere)
    state.json           step, optimiser param groups, scheduler state, best score, matching last.safetensors

Determinism and resume: batch b of epoch e is a fixed function of (seed, e, b) (a seeded permutation, one seeded
caption per image, a per-image augmentation seed), and the global RNG (dropout, hard-negative sampling) is reseeded
from (seed, step, rank) at every optimiser step. So a run resumed from its last checkpoint (`resume=True`) takes
exactly the steps the uninterrupted run would have, and on CPU its loss curve matches it.

Distributed: under `torchrun` (WORLD_SIZE > 1) the process group is opened (gloo on CPU, NCCL on CUDA), each rank
takes its slice of every global batch, the model is wrapped in DDP, and the ITC loss gathers embeddings from all
ranks with gradients (`mmcross.losses.gather_with_grad`). Rank 0 writes the log, checkpoints and evaluations.

The package: `plan` (which images and captions each micro-batch holds, and where its pixels come from), `optim`
(what trains, parameter groups, schedule), `state` (save and resume without pickle), `fusion_phase` (the
frozen-tower phase of `train.fusion_steps`), `loop` (`fit`).
"""

from __future__ import annotations

from mmcross.train.loop import FitResult, fit, train_from_config
from mmcross.train.optim import set_trainable
from mmcross.train.plan import EpochPlan, known_matches

__all__ = ["EpochPlan", "FitResult", "fit", "known_matches", "set_trainable", "train_from_config"]
