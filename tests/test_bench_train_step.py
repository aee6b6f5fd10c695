"""benchmarks.train_step clocks the real training steps of each phase, and only those."""

from __future__ import annotations

import pytest
from train_helpers import make_shapes

import benchmarks.train_step as train_step
from benchmarks.train_step import PARTS, measure

BASE = {"train.batch_size": "8", "train.augment": "false", "train.fusion_batch_size": "6", "train.itm_start": "1.0"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=16, n_dev=6)


def test_towers_phase_clocks_every_part_of_the_steps_it_counts(shapes):
    out = measure(None, "towers", steps=3, warmup=1, overrides={**BASE, "train.data": str(shapes)})
    assert out["phase"] == "towers" and out["steps_timed"] == 3
    share = out["share"]
    assert set(share) == {*PARTS, "clip, optimiser, rest"}
    assert all(share[p] > 0 for p in PARTS)  # the towers run forward and backward on every step
    assert sum(share.values()) == pytest.approx(1.0, abs=0.01)
    assert out["pairs_per_s"] > 0 and out["s_per_step"] > 0


def test_fusion_phase_counts_only_its_own_steps_and_not_the_feature_cache(shapes):
    out = measure(None, "fusion", steps=2, warmup=1, overrides={**BASE, "train.data": str(shapes)})
    assert out["steps_timed"] == 2  # the two towers' steps before the phase and its warm-up step are left out
    share = out["share"]
    # the phase reads the feature cache: the towers' forward passes (encoding the cache) fall outside its steps
    assert share["image fwd"] == 0 and share["text fwd"] == 0
    assert share["losses fwd"] > 0 and share["backward"] > 0 and share["data"] > 0


def test_on_a_gpu_every_clocked_part_waits_for_the_queued_work(shapes, monkeypatch):
    # a GPU's kernels run after the call that queued them: without a synchronise at both ends the parts would be
    # the launch times. The GPU is simulated (the run itself stays on the CPU); its synchronise calls are counted
    calls = []
    monkeypatch.setattr(train_step, "_gpu_in_use", lambda: True)
    monkeypatch.setattr(train_step.torch.cuda, "synchronize", lambda: calls.append(1))
    monkeypatch.setattr(train_step.torch.cuda, "get_device_name", lambda: "a simulated GPU")
    out = measure(
        None, "towers", steps=3, warmup=1, overrides={**BASE, "train.data": str(shapes), "train.device": "cpu"}
    )
    assert out["device"] == "a simulated GPU" and out["steps_timed"] == 3
    # each timed step, and in it the batch and each of the towers' parts at least once, is bracketed
    assert len(calls) % 2 == 0 and len(calls) >= 2 * 3 * (1 + len(PARTS))


def test_on_the_cpu_nothing_waits(shapes, monkeypatch):
    monkeypatch.setattr(train_step.torch.cuda, "synchronize", lambda: pytest.fail("synchronised on the CPU"))
    out = measure(None, "towers", steps=2, warmup=1, overrides={**BASE, "train.data": str(shapes)})
    assert out["device"] == "cpu"
