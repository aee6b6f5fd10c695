"""Hard-negative evaluation: is each image's true caption scored above its swapped negative?

For every (image, caption, negative) triple of a split, a pair counts as correct when the true caption's score is
strictly higher than the negative's. Reported for the dual encoder (`itc`), the match head alone (`itm`) and the
ranking score (`score` = itm + itc_weight * itc), over all pairs and over the pairs whose caption names a held-out
combination (compositional generalisation). Chance is 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmcross.data.records import Record
from mmcross.encode import encode_images, encode_texts
from mmcross.model import Matcher

KINDS = ("itc", "itm", "score")


@torch.inference_mode()
def hard_negative_eval(
    matcher: Matcher,
    records: Sequence[Record],
    negatives: dict[str, dict[str, str]],
    holdout: Sequence[str] = (),
    batch_size: int = 64,
    kind_of: Callable[[str, str], str] | None = None,
) -> dict:
    """Accuracy of true caption over swapped negative, per score kind, overall and on held-out combinations.

    Args:
        matcher: the model.
        records: images with their captions (e.g. the test split).
        negatives: image_id -> {caption: negative} (`mmcross.data.synth.read_negatives`).
        holdout: "colour shape" combinations held out of training; pairs whose caption names one form the subset.
        batch_size: images per forward pass.
        kind_of: (caption, negative) -> what the negative changed (`mmcross.data.synth.negative_kind`); when given,
            the accuracies are also reported per kind.

    Returns:
        `pairs`, `hard_negative_accuracy_{itc,itm,score}`, and the same with `heldout_` prefixed plus `heldout_pairs`;
        with `kind_of`, `by_kind` and `heldout_by_kind`: {kind: {"pairs", "itc", "itm", "score"}}.
    """
    matcher.eval()
    correct = {kind: [] for kind in KINDS}
    heldout: list[bool] = []
    kinds: list[str] = []
    for batch in encode_images(matcher, list(records), batch_size=batch_size):
        if batch.features is None:
            continue
        rows, trues, falses = [], [], []
        for row, record in enumerate(batch.records):
            for caption, negative in negatives.get(record.image_id, {}).items():
                rows.append(row)
                trues.append(caption)
                falses.append(negative)
                heldout.append(any(combo in caption for combo in holdout))
                kinds.append(kind_of(caption, negative) if kind_of else "")
        if not rows:
            continue
        image_rows = batch.features.select(rows)
        true = matcher.score_pairs(image_rows, encode_texts(matcher, trues, batch_size=len(trues)))
        false = matcher.score_pairs(image_rows, encode_texts(matcher, falses, batch_size=len(falses)))
        for kind in KINDS:
            correct[kind] += (getattr(true, kind) > getattr(false, kind)).tolist()
    if not heldout:
        raise ValueError("no (image, caption, negative) triples: does the dataset come with hard negatives?")
    mask = torch.tensor(heldout)
    result: dict[str, float | int] = {"pairs": len(heldout), "heldout_pairs": int(mask.sum())}
    for kind in KINDS:
        hits = torch.tensor(correct[kind], dtype=torch.float)
        result[f"hard_negative_accuracy_{kind}"] = float(hits.mean())
        if mask.any():
            result[f"heldout_hard_negative_accuracy_{kind}"] = float(hits[mask].mean())
    if kind_of:
        for prefix, subset in (("", torch.ones_like(mask)), ("heldout_", mask)):
            table = {}
            for name in sorted(set(kinds)):
                rows = torch.tensor([k == name for k in kinds]) & subset
                if rows.any():
                    table[name] = {"pairs": int(rows.sum())} | {
                        kind: float(torch.tensor(correct[kind], dtype=torch.float)[rows].mean()) for kind in KINDS
                    }
            result[f"{prefix}by_kind"] = table
    return result
