"""mmcross: image-text matching with an open_clip dual encoder and an MMCA-style cross-attention re-ranker.

The public API is listed in `__all__`; names resolve lazily so `import mmcross` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DataCfg": "mmcross.config",
    "EncoderCfg": "mmcross.config",
    "FusionCfg": "mmcross.config",
    "MatcherCfg": "mmcross.config",
    "InferenceCfg": "mmcross.config",
    "load_matcher_cfg": "mmcross.config",
    "load_encoders": "mmcross.encoders",
    "PretrainedUnavailable": "mmcross.encoders",
    "list_models": "mmcross.factory",
    "create_matcher": "mmcross.factory",
    "save_checkpoint": "mmcross.factory",
    "load_checkpoint": "mmcross.factory",
    "Matcher": "mmcross.model",
    "Scores": "mmcross.model",
    "ImageFeatures": "mmcross.features",
    "TextFeatures": "mmcross.features",
    "ModelRef": "mmcross.config",
    "load_matcher": "mmcross.factory",
    "encode_images": "mmcross.encode",
    "encode_texts": "mmcross.encode",
    "retrieval_metrics": "mmcross.metrics",
    "Record": "mmcross.data.records",
    "open_dataset": "mmcross.data.registry",
    "image_loader": "mmcross.data.loader",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmcross' has no attribute {name!r}")
