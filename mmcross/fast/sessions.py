"""A cached graph (ONNX, or OpenVINO IR for OpenVINO's int8) as a callable for the encoders' `runtime` hook: ONNX
Runtime or OpenVINO."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Run = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def open_session(path: Path, runtime: str) -> Run:
    """Load `path` for `runtime` ("onnx" or "openvino"), using as many threads as torch does."""
    threads = torch.get_num_threads()
    if runtime == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled, tokens = session.run(None, {name: x.detach().cpu().numpy()})
            return torch.from_numpy(pooled), torch.from_numpy(tokens)

        return run
    if runtime == "openvino":
        return openvino_runner(str(path), threads)
    raise ValueError(f"no graph runtime {runtime!r}")


def openvino_runner(model, threads: int | None = None) -> Run:
    """An OpenVINO graph (a file path or an in-memory `openvino.Model`) compiled for the CPU, as a `Run`."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
        # int8 weights (`compress_int8_openvino`): activations quantised at run time in groups of 32 values, as
        # measured (the default of the versions we ran, pinned so the vectors do not move with it)
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 32
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = request.infer([x.detach().cpu().numpy()])
        # the request reuses its output buffers on the next call: copy them out
        pooled, tokens = (np.array(out[compiled.output(i)], copy=True) for i in range(2))
        return torch.from_numpy(pooled), torch.from_numpy(tokens)

    return run
