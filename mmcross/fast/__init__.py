"""The optimised inference path: encoders run as exported graphs (ONNX Runtime or OpenVINO), fp32 or int8.

`use_inference(matcher, InferenceCfg, ref)` sets the towers' `runtime` hooks (`mmcross.encoders`), so every
command that encodes through `mmcross.encode` (index, search, score, embed, eval) runs the graphs; the torch modules
stay in place (training, the fusion re-rank and the weights' fingerprint are untouched). fp32 + torch leaves the
model exactly as it was.

int8 on ONNX Runtime is its dynamic quantisation (weights int8 per output channel, activations quantised per batch
at run time): the runtime's documented choice for transformers, with no calibration set to choose or keep. int8 on
OpenVINO is its own: NNCF's weight compression (weights int8 per output channel; the CPU plugin quantises the
activations at run time in groups of 32), again without a calibration set. Graphs are cached (`mmcross.fast.cache`),
built once per weights.
"""

from __future__ import annotations

import importlib.util
import sys

from mmcross.config import InferenceCfg, ModelRef

PRECISIONS = ("fp32", "int8")
RUNTIMES = ("auto", "torch", "onnx", "openvino")
EXTRA = "the fast extra: pip install -e '.[fast]' in mmcross's folder"  # mmcross is not on the package registry
_said: set[str] = set()


def note(message: str, once: bool = True) -> None:
    """Tell the user `message` on stderr; with `once`, only the first time in this process (commands load and call
    the encoders many times)."""
    if not (once and message in _said):
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def resolve(cfg: InferenceCfg) -> InferenceCfg:
    """`cfg` with `auto` made concrete (torch for fp32, onnx for int8); refuses unknown or impossible pairs."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision takes {' or '.join(PRECISIONS)}, not {cfg.precision!r}")
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"--runtime takes {', '.join(RUNTIMES)}, not {cfg.runtime!r}")
    runtime = cfg.runtime if cfg.runtime != "auto" else ("torch" if cfg.precision == "fp32" else "onnx")
    if runtime == "torch" and cfg.precision == "int8":
        raise ValueError("--precision int8 runs on --runtime onnx or openvino (torch has no int8 path here)")
    return InferenceCfg(cfg.precision, runtime)


def missing_packages(runtime: str, precision: str = "fp32") -> list[str]:
    """Packages of the `fast` extra that `runtime` at `precision` needs and this environment lacks."""
    needed = ["onnx", "onnxscript", "onnxruntime"]
    if runtime == "openvino":
        needed += ["openvino"] + (["nncf"] if precision == "int8" else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def use_inference(matcher, cfg: InferenceCfg, ref: ModelRef):
    """Run `matcher`'s encoders as `cfg` says; returns the matcher, whose `inference` records what runs.

    A runtime whose packages are missing falls back to torch fp32, saying so in one line. Graphs come from (and go
    to) the folders `mmcross.factory.graph_folders` gives for `ref` (how the model was named), each when its tower
    first runs (`OnFirstCall`). Only open_clip CLIP-style text towers are exported (HF and CoCa towers are refused).
    """
    cfg = resolve(cfg)
    matcher.image_encoder.runtime = matcher.text_encoder.runtime = None
    matcher.inference = InferenceCfg("fp32", "torch")
    if cfg.runtime == "torch":
        return matcher
    missing = missing_packages(cfg.runtime, cfg.precision)
    if missing:
        note(f"--runtime {cfg.runtime} needs {', '.join(missing)} ({EXTRA}); running torch fp32 instead")
        return matcher
    if matcher.device.type != "cpu":
        how = (
            f"--precision {cfg.precision} (runtime {cfg.runtime})"
            if cfg.precision != "fp32"
            else f"--runtime {cfg.runtime}"
        )
        fix = "--precision fp32" if cfg.precision != "fp32" else "--runtime torch"
        raise ValueError(
            f"{how} runs the encoders on the CPU, the model is on {matcher.device}: give --device cpu, or {fix}"
        )
    if getattr(matcher.text_encoder, "tower", None) is not None:
        raise ValueError(f"--runtime {cfg.runtime} exports open_clip CLIP-style text towers only, not this model's")
    from mmcross.factory import graph_folders, towers_fingerprint
    from mmcross.fast.cache import graph, openvino_int8_graph
    from mmcross.fast.sessions import open_session

    fingerprint = towers_fingerprint(matcher)
    *read_first, cache_dir = graph_folders(ref, matcher, fingerprint)

    def session(tower: str):
        if (cfg.precision, cfg.runtime) == ("int8", "openvino"):  # OpenVINO's own int8 (NNCF), not ONNX Runtime's
            path = openvino_int8_graph(matcher, tower, cache_dir, fingerprint, read_first)
        else:
            path = graph(matcher, tower, cfg.precision, cache_dir, fingerprint, read_first)
        return open_session(path, cfg.runtime)

    matcher.image_encoder.runtime = OnFirstCall(lambda: session("image"))
    matcher.text_encoder.runtime = OnFirstCall(lambda: session("text"))
    matcher.inference = cfg
    return matcher


class OnFirstCall:
    """A tower's graph session, built (or read from the cache) and loaded when the tower first runs: a command
    that encodes captions only (a search of an index) converts no image graph, and one that encodes images only
    no text graph. `load()` does it now."""

    def __init__(self, open_session):
        self._open, self._run = open_session, None

    def load(self):
        if self._run is None:
            self._run = self._open()
        return self._run

    def __call__(self, x):
        return self.load()(x)


def load_graphs(matcher) -> None:
    """Build or read both towers' graphs now (where `use_inference` attached them), not at their first use."""
    for encoder in (matcher.image_encoder, matcher.text_encoder):
        if isinstance(encoder.runtime, OnFirstCall):
            encoder.runtime.load()
