"""Where an exported INT8 graph departs from the PyTorch fake-quant model, layer by layer.

Every quantizer of the exported model became a DequantizeLinear in the graph; the exporter
names that node after the quantizer's module path (``/model/layer1/layer1.0/conv1/
input_quantizer/DequantizeLinear``; a module called k times gets ``_k`` on its k-th call). Both
sides run one batch; onnxruntime's values come from its own debugging tool
(``quantization.qdq_loss_debug``), which marks every DequantizeLinear output as a graph output.
A marked tensor cannot fuse into an integer kernel, so this compares the graph's function as
written; the integer kernels' own effect shows in the metric and the agreement. Differences are
counted in quantization steps (the tensor's scale): a correct graph is within one step almost
everywhere, a wrong one is off by many steps from its first wrong tensor onwards.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization.calibrate import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                     modify_model_output_intermediate_tensors)
from torch import nn

from . import quant
from .runtime import _GraphIndex

_CALL = re.compile(r"^(.*)_(\d+)$")


def _module_path(scopes: list[str]) -> str:
    """``['model', 'stem', 'stem.0', 'stem.0.0', 'input_quantizer']`` -> ``model.stem.0.0.
    input_quantizer``: the exporter writes each level's path from its ancestor's children."""
    parts: list[str] = []
    for scope in scopes:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def quantizer_of(node_name: str, known: set[str]) -> tuple[str, int] | None:
    """(quantizer name, call index) of a DequantizeLinear the exporter named, or None for one
    no quantizer made (weights the export rewrote, for instance)."""
    scopes = [s for s in node_name.split("/") if s][:-1]
    if not scopes:
        return None
    name = _module_path(scopes)
    if name in known:
        return name, 0
    called = _CALL.match(scopes[-1])
    if called:
        name = _module_path([*scopes[:-1], called.group(1)])
        if name in known:
            return name, int(called.group(2))
    return None


def onnx_tensors(graph: onnx.GraphProto, known: set[str]
                 ) -> dict[tuple[str, int], tuple[str, np.ndarray, int]]:
    """(quantizer, call) -> (the DequantizeLinear output it became, its scale, its axis)."""
    index = _GraphIndex(graph)
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        key = quantizer_of(node.name, known)
        scale = index.constant(node.input[1])
        if key is None or scale is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        found[key] = (node.output[0], scale.astype(np.float64), axis)
    return found


@torch.no_grad()
def _stem(name: str) -> str:
    """The name the exporter gives a module's scope: from its last non-numeric atom on
    (``model.layer2.0.downsample.1`` -> ``downsample.1``, a folded batch norm's quantizer)."""
    atoms = name.split(".")
    last = max((i for i, a in enumerate(atoms) if not a.isnumeric()), default=0)
    return ".".join(atoms[last:])


def onnx_tensors_in_order(graph: onnx.GraphProto, order: list[tuple[str, int]],
                          shapes: dict[tuple[str, int], tuple[int, ...]],
                          graph_sizes: dict[str, int]
                          ) -> dict[tuple[str, int], tuple[str, np.ndarray, int]] | None:
    """(quantizer, call) -> its DequantizeLinear, matched by execution order: the exporter
    emits nodes in the order the trace ran, so the quantizers PyTorch ran appear in that order
    among the graph's DequantizeLinear nodes (with others between them that the export's
    rewrites added), each in a scope named after the quantizer (a ``_k`` counter appended
    where that name repeats). Needed for a ``torch.fx`` rewrite (``quant.graph``), whose
    forward calls every module from the top, so the exporter names a scope by the module's
    own name alone (``/relu_1_9/``, ``/relu_1/output_quantizer_9/``): names repeat across the
    network and its counters mix with the rewrite's suffixes. A match also needs the tensor's
    size to fit PyTorch's shape (``shapes``; ``graph_sizes``, the graph's by tensor name; input
    channels the export padded allowed, as ``_as_shaped`` cuts them); a quantizer of a
    branch the export dropped (an auxiliary head) finds none and is left out. None where fewer
    than nine in ten quantizers are found (the names then decide)."""
    index = _GraphIndex(graph)
    nodes = []
    for node in graph.node:
        scopes = [s for s in node.name.split("/") if s]
        if node.op_type == "DequantizeLinear" and len(scopes) >= 2:
            nodes.append((re.sub(r"_\d+$", "", scopes[-2]), node))
    places, position = {}, 0
    for key in order:
        stem, ahead = _stem(key[0]), position
        while ahead < len(nodes) and (nodes[ahead][0] != stem or not _fits(
                graph_sizes.get(nodes[ahead][1].output[0]), shapes[key])):
            ahead += 1
        if ahead == len(nodes):
            continue   # not in the graph
        node, position = nodes[ahead][1], ahead + 1
        scale = index.constant(node.input[1])
        if scale is not None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            places[key] = (node.output[0], scale.astype(np.float64), axis)
    return places if len(places) >= 0.9 * len(order) else None


def pytorch_tensors(model: nn.Module, inputs: torch.Tensor
                    ) -> tuple[dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]],
                               list[tuple[str, int]]]:
    """Every enabled quantizer's output on ``inputs`` and its quantization step (None where
    the quantizer has no static range), by (quantizer, call), and the order they were
    computed in."""
    values: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = {}
    order: list[tuple[str, int]] = []
    calls: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            key = (name, calls.get(name, 0))
            calls[name] = key[1] + 1
            step = None
            if module.amax is not None:
                step = (module.amax.detach().cpu().double() / quant.grid_bounds(module)[1]
                        ).numpy()
            values[key] = (output.detach().cpu().double().numpy(), step)
            order.append(key)
        return hook

    handles = [q.register_forward_hook(record(n))
               for n, q in quant.quantizers(model).items() if q.is_enabled]
    try:
        model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    return values, order


class _OneBatch(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray) -> None:
        self.feeds = iter([{name: x}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _graph_values(path: Path, inputs: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented),
                                                 op_types_for_saving=["DequantizeLinear"])
        input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        values = collect_activations(str(augmented), _OneBatch(input_name, inputs), options,
                                     ["CPUExecutionProvider"])
    return {k: v[0] for k, v in values.items()}


def _fits(size: int | None, shape: tuple[int, ...]) -> bool:
    """Whether a graph tensor of ``size`` elements can be PyTorch's of ``shape``
    (``_as_shaped``); an unknown size fits."""
    return size is None or _as_shaped(np.empty(size, dtype=np.uint8), shape) is not None


def _as_shaped(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The graph's flattened tensor in PyTorch's ``shape``; an input whose channels the export
    padded (zeros appended along axis 1) is cut back to the original channels."""
    if flat.size == int(np.prod(shape)):
        return flat.reshape(shape)
    if len(shape) == 4:
        per_channel = shape[0] * shape[2] * shape[3]
        if flat.size % per_channel == 0 and flat.size // per_channel > shape[1]:
            return flat.reshape(shape[0], -1, shape[2], shape[3])[:, :shape[1]]
    return None


def compare_layers(model: nn.Module, path: str | Path, inputs: torch.Tensor, threads: int
                   ) -> list[dict[str, Any]]:
    """One row per quantized tensor, in execution order: the share of its elements on which
    the graph and ``model`` differ by more than one quantization step (``model``'s: what was
    calibrated or trained), and the largest difference in steps. ``model`` is the exported
    module (batch norm folded)."""
    known = set(quant.quantizers(model))
    graph = onnx.load(str(path)).graph
    reference, order = pytorch_tensors(model, inputs)
    values = _graph_values(Path(path), inputs.cpu().numpy(), threads)
    places = onnx_tensors_in_order(graph, order, {k: v[0].shape for k, v in reference.items()},
                                   {k: v.size for k, v in values.items()}) \
        or onnx_tensors(graph, known)
    rows = []
    for key in order:
        if key not in places:
            continue
        tensor, scale, axis = places[key]
        expected, step = reference[key]
        got = _as_shaped(values[tensor].astype(np.float64), expected.shape) \
            if tensor in values else None
        if got is None:
            continue
        if step is None:                 # no static range in PyTorch: the graph's own scale
            step = np.abs(scale)
            if step.size > 1:
                shape = [1] * expected.ndim
                shape[axis] = step.size
                step = step.reshape(shape)
        steps = np.abs(got - expected) / np.where(step > 0, step, 1.0)
        off = steps > 1.001          # float32 rounding of values many steps from zero
        name, call = key
        rows.append({"index": len(rows), "quantizer": name if call == 0 else f"{name}#{call}",
                     "kind": "weight" if name.endswith(quant.WEIGHT) else "activation",
                     "onnx_tensor": tensor, "elements": int(expected.size),
                     "off_by_more_than_one_step": float(off.mean()),
                     "max_steps_off": float(steps.max()) if steps.size else 0.0})
    return rows


def first_divergence(rows: list[dict[str, Any]], max_share: float) -> dict[str, Any] | None:
    """The first tensor (in execution order) with more than ``max_share`` of its elements more
    than one step off."""
    return next((r for r in rows if r["off_by_more_than_one_step"] > max_share), None)


def describe(row: dict[str, Any]) -> str:
    """``layer3.1.conv2 weight, 4.1% of elements more than one step off (largest 9.0)``."""
    name = row["quantizer"]
    for suffix, what in ((f".{quant.WEIGHT}", "weight"), (".input_quantizer", "input"),
                         (".output_quantizer", "output")):
        if name.split("#")[0].endswith(suffix):
            name = name.replace(suffix, "", 1) + f" {what}"
            break
    return (f"{name.removeprefix('model.')}, {row['off_by_more_than_one_step']:.1%} of elements "
            f"more than one step off (largest {row['max_steps_off']:.1f} steps)")
