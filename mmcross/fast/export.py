"""torch towers -> ONNX graphs (dynamic batch, and caption length for text), and their int8 versions: ONNX
Runtime's (dynamic quantisation) and OpenVINO's (NNCF weight compression).

The dynamo exporter (`torch.onnx.export(dynamo=True)`) is used: the TorchScript exporter bakes the caption length
into the text tower's attention reshapes (open_clip's `nn.MultiheadAttention`), so a graph exported at one length
fails at another.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 18


class _ImageGraph(nn.Module):
    """pixels (B, 3, H, W) -> pooled (B, E), tokens (B, P, Dv): the torch path of `ImageEncoder`."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(pixels)
        return features.pooled, features.tokens


class _TextGraph(nn.Module):
    """ids (B, L), cut to the longest caption -> pooled (B, E), states (B, L, Dt): `TextEncoder.core`."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.core(ids)


def export_tower(matcher, tower: str, path: Path) -> None:
    """Write `matcher`'s `tower` ("image" or "text") as an fp32 ONNX graph at `path` (weights inside the file)."""
    image, text = matcher.image_encoder, matcher.text_encoder
    saved = image.runtime, text.runtime
    image.runtime = text.runtime = None  # export the torch modules, never a graph already attached
    try:
        if tower == "image":
            h, w = image.image_size
            module, args = _ImageGraph(image), (torch.randn(2, 3, h, w),)
            names, dims = ["pixels"], ({0: torch.export.Dim("batch")},)
        else:
            ids = text.tokenize(["a photo of a dog on the beach", "two cats"])[:, :8]
            module, args = _TextGraph(text), (ids,)
            length = torch.export.Dim("length", max=int(text.context_length))
            names, dims = ["ids"], ({0: torch.export.Dim("batch"), 1: length},)
        # the exporter reports its steps on stdout, where `embed` writes its JSON: send them to stderr
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                input_names=names,
                output_names=["pooled", "tokens"],
                dynamic_shapes=dims,
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                verbose=False,
            )
    finally:
        image.runtime, text.runtime = saved


INT8_OPS = ["MatMul", "Gemm"]


def quantize_int8(fp32: Path, path: Path) -> None:
    """ONNX Runtime dynamic quantisation of `fp32` into `path`: weights int8 per output channel; activations uint8
    with scales computed per batch at run time (so no calibration set), the runtime's advice for transformers.

    `reduce_range` stays off: on random-init ViT-B-32 it lowered the text cosine to fp32 (0.99925 -> 0.99828 mean).
    Only the matrix products are quantised (`INT8_OPS`): ONNX Runtime's ConvInteger is slower on a CPU than its fp32
    convolution, which made the conv towers (`rn-small`) slower in int8 than in fp32 (the index's images/s: 33.9
    int8 vs 42.3 torch fp32); a ViT's one convolution, its patch embedding, stays fp32 too.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_name(path.stem + ".pre.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(
                str(pre), str(path), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=INT8_OPS
            )
    finally:
        pre.unlink(missing_ok=True)


def compress_int8_openvino(fp32: Path, path: Path) -> None:
    """OpenVINO's int8 graph of the fp32 ONNX graph `fp32`, written as OpenVINO IR (`path`, an `.xml`, and its
    `.bin`): NNCF's weight compression, weights int8 symmetric per output channel (no calibration set). OpenVINO's
    CPU plugin then quantises the activations of those layers at run time (groups of 32 values,
    `DYNAMIC_QUANTIZATION_GROUP_SIZE`), so the matrix products run in int8.

    On random-init ViT-B-32 (200 Flickr8k images, 1,000 captions; `benchmarks/bench_nncf.py`) its vectors are closer
    to torch fp32 than ONNX Runtime's dynamic int8 (image cosine mean 0.99992, text 0.99959) and than NNCF's
    calibrated `nncf.quantize` on the user's first 64 images (0.99978, 0.99931, min 0.997); asymmetric weights gave the
    same cosines. ONNX Runtime's own int8 graph, run by OpenVINO, was slower than OpenVINO fp32 (README).
    """
    import logging

    # importing nncf imports torch's cpp_extension, which warns that this machine has no CUDA: not our concern here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf
    import openvino as ov
    import rich

    # NNCF logs its statistics table to stdout, where `embed` writes its JSON: only its warnings, and on stderr
    logger = logging.getLogger("nncf")
    consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # not FileHandler (a subclass)
    streams = {h: h.stream for h in consoles if h.stream is not sys.stderr}
    level = logger.level
    for handler in streams:
        handler.setStream(sys.stderr)
    logger.setLevel(logging.WARNING)
    # NNCF draws its own rich bar on rich's global console, even under --quiet and into logs; the build is reported
    # by mmcross's own note ("built the int8 ... graph"), so that console stays quiet for the call
    console = rich.get_console()
    was_quiet, console.quiet = console.quiet, True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            model = nncf.compress_weights(ov.Core().read_model(str(fp32)), mode=nncf.CompressWeightsMode.INT8_SYM)
            ov.save_model(model, str(path), compress_to_fp16=False)
    finally:
        console.quiet = was_quiet
        logger.setLevel(level)
        for handler, stream in streams.items():
            handler.setStream(stream)
