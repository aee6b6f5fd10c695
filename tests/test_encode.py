"""The encoding stage: length-bucketed captions equal open_clip's, records keep order and reject bad images, queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmcross.data.records import Record
from mmcross.encode import embed, encode_pixels, encode_query, encode_records, encode_texts
from mmcross.encoders import build_open_clip_reference
from mmcross.factory import create_matcher

CAPTIONS = [
    "a dog",
    "two people walk along the beach at dusk with a red kite",
    "cat",
    " ".join(["a very long caption that goes on and on"] * 20),  # far past the 77-token context
    "a child in a pink dress is climbing up a set of stairs in an entry way .",
]


@pytest.fixture(scope="module")
def matcher():
    return create_matcher("tiny")


def test_length_bucketed_captions_equal_open_clip_in_input_order(matcher):
    model, tokenizer = build_open_clip_reference(matcher.cfg.encoder)
    with torch.inference_mode():
        expected = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
    got = encode_texts(matcher, CAPTIONS, batch_size=2)  # 3 batches of different lengths, sorted and put back
    assert (got.pooled - expected).abs().max() <= 1e-5
    assert got.mask.shape == got.tokens.shape[:2] and got.mask.shape[0] == len(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):  # each row equals the caption encoded alone, padding aside
        alone = encode_texts(matcher, [caption])
        n = int(alone.mask.sum())
        assert got.mask[i].sum() == n and not got.mask[i, n:].any()
        assert torch.allclose(got.tokens[i, :n], alone.tokens[0], atol=1e-5)
    pooled_only = encode_texts(matcher, CAPTIONS, batch_size=2, tokens=False)
    assert pooled_only.tokens.shape[1] == 0 and torch.equal(pooled_only.pooled, got.pooled)
    with pytest.raises(ValueError, match=r"empty caption at position\(s\) \[1\]"):
        encode_texts(matcher, ["a dog", "  "])


def test_records_keep_input_order_and_reject_bad_images(matcher, tmp_path):
    paths = []
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (50, 40), colour).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    records = [Record(str(i), ["x"], path=p) for i, p in enumerate([paths[0], tmp_path / "bad.jpg", *paths[1:]])]
    encoded = encode_records(matcher, records, batch_size=2)
    assert encoded.indices == [0, 2, 3] and [r.image_id for r in encoded.records] == ["0", "2", "3"]
    assert len(encoded.rejects) == 1 and encoded.rejects[0].path.endswith("bad.jpg")
    pixels = torch.stack([matcher.image_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    reference = encode_pixels(matcher, pixels)
    assert torch.allclose(encoded.features.pooled, reference.pooled, atol=1e-6)
    assert torch.allclose(encoded.features.tokens, reference.tokens, atol=1e-5)
    assert torch.allclose(encoded.features.pooled.norm(dim=-1), torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="no image could be read"):
        encode_records(matcher, [records[1]])

    vectors = embed(matcher, images=paths[:1], captions=["a red square"])  # images first, then captions
    assert vectors.shape == (2, 128) and vectors.dtype == np.float32
    assert np.allclose(vectors[0], reference.pooled[0].numpy(), atol=1e-6)
    assert np.allclose(vectors[1], encode_texts(matcher, ["a red square"]).pooled[0].numpy(), atol=1e-6)
    image = encode_query(matcher, image=paths[2])
    assert torch.allclose(image.pooled, reference.pooled[2:], atol=1e-6)
    assert torch.allclose(encode_query(matcher, text="a red square").pooled, torch.from_numpy(vectors[1:]), atol=1e-6)
    with pytest.raises(ValueError, match="empty query caption"):
        encode_query(matcher, text=" ")
    with pytest.raises(FileNotFoundError):
        encode_query(matcher, image=tmp_path / "nope.png")
    with pytest.raises(ValueError, match="cannot read query image"):
        encode_query(matcher, image=tmp_path / "bad.jpg")
