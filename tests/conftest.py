"""Shared fixtures: the tiny preset's encoders are built once per session; the index tests' generated dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from index_helpers import make_dataset

from mmcross.config import load_matcher_cfg
from mmcross.encoders import Encoders, load_encoders

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_matcher_cfg("tiny")


@pytest.fixture(scope="session")
def tiny_encoders(tiny_cfg) -> Encoders:
    return load_encoders(tiny_cfg.encoder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 drawn images in Flickr layout, one caption naming a missing file (`index_helpers.make_dataset`); a module
    that needs another dataset defines its own `dataset`."""
    return make_dataset(tmp_path_factory.mktemp("ds"), n=12)


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip("../shared/data/flickr8k is not on this machine")
    return FLICKR8K


@pytest.fixture(scope="session", autouse=True)
def _decoded_image_cache(tmp_path_factory):
    """Training runs keep their decoded images in a session folder, never in the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MMCROSS_CACHE", str(tmp_path_factory.mktemp("mmcross-cache")))
    yield
    mp.undo()
