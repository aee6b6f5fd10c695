"""The DataLoader helper for index and train: decode + transform in workers, rejects passed back, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import BLUE, RED, image_bytes, write

from mmcross.config import DataCfg
from mmcross.data.loader import image_loader
from mmcross.data.parallel import imap_ordered
from mmcross.data.records import Record, Reject, RejectLog, read_rejects


def to_tensor(image) -> torch.Tensor:
    """A picklable transform: resize to 8x8, (3, 8, 8) floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def fails_on_blue(image) -> torch.Tensor:
    if image.getpixel((0, 0)) == BLUE:
        raise RuntimeError("blue is not allowed")
    return to_tensor(image)


@pytest.fixture
def records(tmp_path):
    good = write(tmp_path / "good.png", image_bytes(RED, fmt="PNG"))
    write(tmp_path / "bad.jpg", "not an image")
    return [
        Record("good", ["a"], "train", path=good),
        Record("bad", ["b"], "train", path=tmp_path / "bad.jpg"),
        Record("bytes", ["c"], "train", data=image_bytes(BLUE, fmt="PNG"), origin="s.tar"),
        Record("missing", ["d"], "train", path=tmp_path / "missing.jpg"),
        Record("empty", ["e"], "train", data=b"", origin="s.tar"),
    ]


def _collect(loader):
    indices, rejects, pixels, ids = [], {}, [], []
    for batch in loader:
        indices += batch.indices
        ids += [r.image_id for r in batch.records]
        assert all(r.data is None for r in batch.records)  # the bytes stay in the worker
        if batch.pixels is not None:
            assert batch.pixels.shape == (len(batch.indices), 3, 8, 8)
            pixels.append(batch.pixels)
        rejects.update({i: r.reason for i, r in batch.rejects})
    return indices, rejects, torch.cat(pixels), ids


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_returns_images_and_rejects(records, workers):
    indices, rejects, pixels, ids = _collect(image_loader(records, to_tensor, batch_size=2, workers=workers))
    assert indices == [0, 2] and ids == ["good", "bytes"]
    assert sorted(rejects) == [1, 3, 4]
    assert "not an image" in rejects[1] and rejects[3] == "missing file" and "0 bytes" in rejects[4]
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(RED, dtype=torch.float32) / 255)


def test_streamed_records_and_a_failing_transform(records):
    loader = image_loader(lambda: iter(records), fails_on_blue, batch_size=3, workers=2)
    indices, rejects, _, _ = _collect(loader)
    assert indices == [0]
    assert "transform failed: RuntimeError: blue is not allowed" in rejects[2]


def test_whole_batch_rejected_gives_no_pixels(records):
    batches = list(image_loader(records[3:], to_tensor, batch_size=2))
    assert batches[0].pixels is None and len(batches[0].rejects) == 2


def test_pixel_limit_reaches_the_workers(records):
    batch = next(iter(image_loader(records[:1], to_tensor, cfg=DataCfg(max_image_pixels=10))))
    assert batch.pixels is None and "too many pixels" in batch.rejects[0][1].reason


def test_reject_log_and_parallel_map(tmp_path):
    log = RejectLog(tmp_path / "job")
    log.write(
        [Reject("a.jpg", "missing file", image_id="a"), (3, Reject("t.txt", "empty caption", kind="caption", line=2))]
    )
    assert log.count == 2
    assert read_rejects(log.path) == [
        {"path": "a.jpg", "reason": "missing file", "image_id": "a", "kind": "image"},
        {"path": "t.txt", "reason": "empty caption", "kind": "caption", "line": 2},
    ]
    assert list(imap_ordered(abs, range(-50, 50), workers=2, chunksize=7)) == [abs(i) for i in range(-50, 50)]


def test_a_resumed_jobs_reject_log_keeps_what_was_found_before(tmp_path):
    first, again = Reject("a.jpg", "missing file", image_id="a"), Reject("b.jpg", "truncated image", image_id="b")
    RejectLog(tmp_path).write([first])
    resumed = RejectLog(tmp_path, keep=True)  # a resumed run meets only what comes after its checkpoint
    assert resumed.count == 1
    resumed.write([first, again, again])  # met again: not repeated
    assert resumed.count == 2 and [r["path"] for r in read_rejects(resumed.path)] == ["a.jpg", "b.jpg"]
    assert RejectLog(tmp_path).count == 0 and read_rejects(resumed.path) == []  # a fresh job starts it empty
