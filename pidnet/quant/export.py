"""The deployed form of a fake-quant model: batch norm folded, written to ONNX with Q/DQ nodes."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from ..errors import CheckpointError
from .dataflow import conv_batch_norm_pairs, trace_dataflow
from .modules import WEIGHT, grid_bounds, quantizers

logger = logging.getLogger(__name__)


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """Fold every batch norm that reads a convolution's output (and is its only reader) into
    that convolution, in place; returns the (conv, batch norm) pairs.

    Per-channel weight ranges are scaled by ``|gamma / sigma|``, so the folded INT8 weights are
    the grid that was calibrated or trained. The batch norm's output quantizer, if any, takes
    its place, so the output is quantized where it was. Requires eval-mode batch norm."""
    flow = trace_dataflow(model, example, skip=TensorQuantizer)
    modules = dict(model.named_modules())
    pairs = conv_batch_norm_pairs(model, flow)
    for conv_name, name in pairs:
        conv, bn = modules[conv_name], modules[name]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        wq = getattr(conv, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and wq.is_enabled and wq.amax is not None:
            if wq.amax.numel() != scale.numel():   # refused when quantizers are inserted
                raise CheckpointError(f"{conv_name} has a per-tensor weight range, which "
                                      f"folding {name} would change; quantize with "
                                      "quant.per_channel=true")
            wq.amax = wq.amax * scale.abs().reshape(wq.amax.shape)
        out_q = getattr(bn, "output_quantizer", None)
        replacement = out_q if isinstance(out_q, TensorQuantizer) and out_q.is_enabled \
            else nn.Identity()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return pairs


def disable_all(model: nn.Module) -> None:
    """Every quantizer off: the model computes in float."""
    for q in quantizers(model).values():
        q.disable()


@torch.no_grad()
def _weights_on_grid(model: nn.Module) -> None:
    """Clamp every quantized weight to its quantizer's grid, in place: the fake-quant function
    is unchanged, and ONNX's QuantizeLinear, which saturates to the full int8 range, then gives
    the integers trained on the symmetric grid (a clipped range leaves weights beyond it).
    modelopt's INT8 export refuses a signed narrow range; on clamped weights the full range
    gives the same integers, so the weight quantizers are exported as full-range."""
    for module in model.modules():
        q = getattr(module, WEIGHT, None)
        if not isinstance(q, TensorQuantizer) or not q.is_enabled or q.amax is None:
            continue
        bottom, top = grid_bounds(q)
        step = q.amax / top
        module.weight.copy_(torch.clamp(module.weight, bottom * step, top * step))
        q.narrow_range = False


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int,
                dynamic_batch: bool = False) -> Path:
    """Write ``model`` (fake-quant modules export as QuantizeLinear/DequantizeLinear) to ONNX
    with one input ``input`` and one output ``logits``. modelopt's quantizers export only
    through the TorchScript-based exporter (``dynamo=False``). The quantized weights are
    clamped to their grid first (the model computes the same function)."""
    path = Path(path)
    _weights_on_grid(model)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")          # tracer warnings about Python scalars
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          dynamic_axes=axes, do_constant_folding=True)
    return path
