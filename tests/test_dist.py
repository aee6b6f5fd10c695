"""Device choice of a training job without a GPU here: CUDA is simulated, the calls torch would receive recorded."""

from __future__ import annotations

import pytest
import torch

from mmcross.dist import setup_training


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with two CUDA devices, device 1 current; records what `torch.cuda.set_device` is given."""
    given = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", given.append)
    return given


@pytest.mark.parametrize(("name", "index"), [("auto", 1), ("cuda", 1), ("cuda:0", 0)])
def test_a_single_gpu_run_gets_an_indexed_device(fake_cuda, name, index):
    # torch.cuda.set_device(torch.device("cuda")) raises ("Expected a torch.device with a specified index"): every
    # single-GPU `mmcross train` stopped there, seen on an H200
    assert setup_training(name) == (0, 1, torch.device("cuda", index))
    assert fake_cuda == [torch.device("cuda", index)]


def test_cpu_is_taken_when_asked_even_beside_a_gpu(fake_cuda):
    assert setup_training("cpu") == (0, 1, torch.device("cpu"))
    assert fake_cuda == []


def test_a_cuda_device_that_is_not_there_is_one_clear_error(fake_cuda, monkeypatch):
    with pytest.raises(ValueError, match=r"train.device=cuda:2, but this machine has 2 CUDA device\(s\)"):
        setup_training("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device=cuda, but this machine has no CUDA device"):
        setup_training("cuda")
    assert fake_cuda == []
