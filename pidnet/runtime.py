"""Running exported graphs in onnxruntime: sessions, outputs, what its optimizer made of the
Q/DQ nodes, and float-vs-INT8 latency measured in one interleaved run."""
from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

# ops onnxruntime runs on integers after fusing the Q/DQ nodes around them
INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
               "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu")
QUANTIZABLE = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Sigmoid", "Concat", "AveragePool",
               "GlobalAveragePool")


def session(path: str | Path, threads: int, optimized_path: str | Path | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            profile_prefix: str | Path | None = None) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and graph optimization at ``level``
    (all of it by default); optionally writing the optimized graph to ``optimized_path`` or
    profiling every run into files starting with ``profile_prefix``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The float32 standard-normal input every timing feeds."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run(sess: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0])


class OrtModel(nn.Module):
    """An onnxruntime session behind ``nn.Module.forward``, so the hooks' ``evaluate`` scores
    the exported graph as it scores the PyTorch model. A static batch size is met by running
    the batch in slices (the last one padded). ``form`` puts the graph's one output where the
    PyTorch model returns its prediction (``{'out': logits}`` for a torchvision model), so the
    hooks' criterion and ``evaluate`` read it as they read the model's."""

    def __init__(self, sess: ort.InferenceSession, batch: int | None,
                 form: Callable[[torch.Tensor], Any] | None = None) -> None:
        super().__init__()
        self.sess, self.batch, self.form = sess, batch, form
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self._logits(x)
        return self.form(logits) if self.form is not None else logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or len(x) == self.batch:
            return run(self.sess, x)
        parts = []
        for start in range(0, len(x), self.batch):
            part = x[start:start + self.batch]
            pad = self.batch - len(part)
            if pad:
                part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])
            parts.append(run(self.sess, part)[:self.batch - pad])
        return torch.cat(parts)


def optimized_ops(path: str | Path, threads: int) -> dict[str, Any]:
    """Op counts of the graph onnxruntime runs after its optimizer (level: extended, where
    the Q/DQ fusions happen, before layout-specific rewrites): integer kernels, and the
    quantizable ops left in float, counted and by node name."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, threads, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        graph = onnx.load(str(out)).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    left = collections.defaultdict(list)   # the float ops by node name (the exporter's scope;
    for node in graph.node:                # a node onnxruntime made has none: by its output)
        if node.op_type in (*QUANTIZABLE, "FusedConv"):
            left[node.op_type].append(node.name or node.output[0])
    return {"integer": {k: counts[k] for k in INTEGER_OPS if counts[k]},
            "float": {k: counts[k] for k in QUANTIZABLE if counts[k]},
            "float_nodes": dict(left),
            "quantize_linear": counts["QuantizeLinear"],
            "dequantize_linear": counts["DequantizeLinear"],
            "integer_convs": counts["QLinearConv"] + counts["ConvInteger"],
            "all_convs": counts["QLinearConv"] + counts["ConvInteger"] + counts["Conv"]
            + counts["FusedConv"]}


def paired_latency(paths: dict[str, str | Path], shape: tuple[int, ...], threads: int,
                   runs: int, block: int = 10, settle: int = 5, seed: int = 0
                   ) -> dict[str, Any]:
    """Median latency of each graph on the same random input, and the median over rounds of
    the first graph's time over each graph's (its speedup), with the graphs interleaved so
    machine noise hits them alike.

    Graphs take turns in blocks of ``settle`` untimed and ``block`` timed back-to-back runs
    (the order rotated by one every round, so each graph takes each place equally often and,
    with three or more, always follows another graph; reversing it let the first and last
    follow themselves across rounds and never the middle one, which measured 2-3% slower for
    it), about ``runs`` timed runs each. Switching sessions costs the next runs (caches
    refilled, the other session's worker threads still spinning): run by run, PIDNet-S at
    128x256 timed 17-27 ms float and 9-14 ms INT8, against 6.9 and 3.5 ms back to back, which
    is how a deployed model runs. With 2 untimed runs in blocks of 5, LRASPP at 256x512 (10 ms
    a run) measured 1.13x and 1.37x float for the same graphs minutes apart; hence the longer
    defaults."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = random_input(shape, seed)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    names = list(sessions)
    rounds: list[dict[str, float]] = []
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(1 + -(-runs // block)):          # round 0 warms every session up
        medians = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            timed = []
            for j in range(settle + block):
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                if j >= settle:
                    timed.append(time.perf_counter() - start)
            medians[name] = statistics.median(timed)
            if i:
                times[name] += timed
        if i:
            rounds.append(medians)
    base = names[0]
    return {"median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
            "speedup_over_" + base: {k: statistics.median(r[base] / r[k] for r in rounds)
                                     for k in names},
            "runs": len(times[base]), "block": block, "settle": settle, "threads": threads,
            "shape": list(shape)}


def op_times(path: str | Path, shape: tuple[int, ...], threads: int, runs: int = 10,
             seed: int = 0) -> dict[str, float]:
    """Milliseconds per run spent in each op type of the graph onnxruntime runs, from its
    profiler (each node's median over ``runs`` runs and a warm-up), most expensive first:
    where the time of a graph goes."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, profile_prefix=Path(tmp) / "profile")
        feed = {sess.get_inputs()[0].name: random_input(shape, seed)}
        for _ in range(runs + 1):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            nodes[event["args"]["op_name"], event["name"]].append(event["dur"] / 1000)
    totals: collections.Counter[str] = collections.Counter()
    for (op, _node), durations in nodes.items():
        totals[op] += statistics.median(durations)
    return {op: round(ms, 3) for op, ms in totals.most_common()}


class _GraphIndex:
    """Lookups over an ONNX graph: each tensor's producer and readers, and constant values
    (initializers, Constant nodes and the Identity nodes the exporter adds for shared ones)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[Any]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return onnx.numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":
            return self.constant(node.input[0])
        return None


def activations_to_uint8(path: str | Path) -> int:
    """Rewrite every per-tensor int8 activation Q/DQ pair (zero point 0) of the ONNX file as
    uint8 with zero point 128, in place; returns how many. The grid is the same (q + 128), so
    outputs are bit-identical, but every activation now has onnxruntime's preferred type:
    integer kernels with inputs of one type fuse (QLinearAdd needs both inputs and the output
    alike; ReLU outputs are uint8 already) and convolutions take the u8s8 path on x86."""
    model = onnx.load(str(path))
    graph = model.graph
    index = _GraphIndex(graph)
    converted = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]:
        if index.constant(q.input[0]) is not None:          # a weight: stays int8
            continue
        zero = index.constant(q.input[2])
        if zero is None or zero.dtype != np.int8 or zero.size != 1 or zero.item() != 0:
            continue
        name = f"{q.output[0]}_zero_point_u8"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(128, np.uint8), name))
        q.input[2] = name
        for dq in index.readers[q.output[0]]:
            if dq.op_type == "DequantizeLinear":
                dq.input[2] = name
        converted += 1
    onnx.save(model, str(path))
    return converted


def _insert_before(graph: onnx.GraphProto, anchor: Any, *nodes: Any) -> None:
    """Put ``nodes``, in order, just before ``anchor``: the graph stays topologically sorted."""
    position = list(graph.node).index(anchor)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def _per_channel_affine(node: Any, index: _GraphIndex, channels: dict[str, int]
                        ) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(input, a, b) when ``node`` computes ``a * x + b`` per channel of its one non-constant
    input x, an image batch (``channels`` holds those), with constant a and b: an inference
    batch norm, ``c - x`` for a scalar c, or a hard sigmoid ``clip(alpha * x + beta, 0, 1)``
    whose clip its output quantizers make anyway (see ``_clipped_to_unit_by_output``)."""
    if node.op_type == "BatchNormalization" and node.input[0] in channels:
        params = [index.constant(name) for name in node.input[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return node.input[0], scale, beta - mean * scale
    if node.op_type == "HardSigmoid" and node.input[0] in channels and \
            _clipped_to_unit_by_output(node, index):
        attrs = {a.name: a.f for a in node.attribute}
        n = channels[node.input[0]]
        return (node.input[0], np.full(n, attrs.get("alpha", 0.2)),
                np.full(n, attrs.get("beta", 0.5)))
    if node.op_type == "Sub" and node.input[1] in channels:
        c = index.constant(node.input[0])
        if c is None or c.size != 1:
            return None
        n = channels[node.input[1]]
        return node.input[1], -np.ones(n), np.full(n, float(c.item()))
    return None


def _clipped_to_unit_by_output(node: Any, index: _GraphIndex) -> bool:
    """Every reader of the node's output is a per-tensor QuantizeLinear to uint8 with zero
    point 0 and a largest value of at most 1: its saturation clips to [0, amax] within
    [0, 1], so ``q(clip(y, 0, 1)) == q(y)`` for every y and the clip may go. The squeeze-excite
    and hardswish gates, quantized unsigned, meet it."""
    readers = index.readers[node.output[0]]
    for q in readers:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            return False
        scale, zero = index.constant(q.input[1]), index.constant(q.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or \
                zero.dtype != np.uint8 or zero.item() != 0 or 255 * scale.item() > 1 + 1e-6:
            return False
    return bool(readers)


def _quantized_output(node: Any, index: _GraphIndex) -> bool:
    """Every reader of the node's output is a QuantizeLinear, or a Relu whose readers all are."""
    readers = index.readers[node.output[0]]
    if len(readers) == 1 and readers[0].op_type == "Relu":
        readers = index.readers[readers[0].output[0]]
    return bool(readers) and all(r.op_type == "QuantizeLinear" for r in readers)


def affine_ops_to_depthwise(path: str | Path) -> int:
    """Rewrite each per-channel affine op between a per-tensor DequantizeLinear and a
    QuantizeLinear (optionally through a Relu) as a 1x1 depthwise convolution with int8
    weights and an int32 bias, in place; returns how many. These are the batch norms that
    follow no convolution (PIDNet's pre-activation BN-ReLU-conv in the PAPPM and the head),
    the complements ``1 - gate``, and the hard sigmoids of squeeze-excite blocks and
    hardswish (MobileNetV3) whose unsigned output quantizer does their clip: onnxruntime has
    no integer kernel for them, so they ran as DequantizeLinear, a float op and
    QuantizeLinear (its own ``quantize_static`` leaves them so); as a convolution they fuse
    into one QLinearConv.

    The weights are exact: one weight per channel, quantized per channel, is +-127 at scale
    |a| / 127. The bias is quantized at input scale x weight scale, as onnxruntime's own
    quantizer does, far finer than the output's step. Ops whose bias would overflow int32, or
    whose output is read in float, are left alone."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    index = _GraphIndex(graph)
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in graph.value_info
                if len(v.type.tensor_type.shape.dim) == 4      # N, C, H, W: a 1x1 conv fits
                and v.type.tensor_type.shape.dim[1].HasField("dim_value")}
    rewritten = 0
    for node in list(graph.node):
        affine = _per_channel_affine(node, index, channels)
        if affine is None or not _quantized_output(node, index):
            continue
        x, a, b = affine
        dq = index.producer.get(x)
        x_scale = index.constant(dq.input[1]) if dq is not None and \
            dq.op_type == "DequantizeLinear" else None
        if x_scale is None or x_scale.size != 1:
            continue
        w_scale = np.where(a == 0, 1.0, np.abs(a) / 127).astype(np.float32)
        b_scale = (w_scale * np.float32(x_scale.item())).astype(np.float32)
        b_int = np.round(b / b_scale)
        if np.abs(b_int).max() >= 2**31:
            continue
        prefix = f"{node.name or node.output[0]}_depthwise"
        tensors = {"w": np.round(a / w_scale).astype(np.int8).reshape(-1, 1, 1, 1),
                   "w_scale": w_scale, "w_zero": np.zeros(len(a), np.int8),
                   "b": b_int.astype(np.int32), "b_scale": b_scale,
                   "b_zero": np.zeros(len(a), np.int32)}
        graph.initializer.extend(onnx.numpy_helper.from_array(v, f"{prefix}/{k}")
                                 for k, v in tensors.items())
        new = [onnx.helper.make_node("DequantizeLinear", [f"{prefix}/{k}" for k in (
                   kind, f"{kind}_scale", f"{kind}_zero")], [f"{prefix}/{kind}_dq"], axis=0,
                   name=f"{prefix}/{kind}_dq") for kind in ("w", "b")]
        new.append(onnx.helper.make_node("Conv", [x, f"{prefix}/w_dq", f"{prefix}/b_dq"],
                                         list(node.output), group=len(a), kernel_shape=[1, 1],
                                         name=prefix))
        _insert_before(graph, node, *new)
        graph.node.remove(node)
        rewritten += 1
    _remove_unused_initializers(graph)
    del graph.value_info[:]              # shapes inferred for the rewrite, not part of the file
    onnx.save(model, str(path))
    return rewritten


def _paddable(conv: Any, index: _GraphIndex) -> tuple[Any, Any] | None:
    """(input DequantizeLinear, float weight initializer) of a quantized, ungrouped
    convolution whose weight (float -> QuantizeLinear per output channel -> DequantizeLinear,
    modelopt's form) no other node reads; None for any other."""
    if next((a.i for a in conv.attribute if a.name == "group"), 1) != 1:
        return None
    dq, weight_dq = (index.producer.get(name) for name in conv.input[:2])
    weight_q = index.producer.get(weight_dq.input[0]) if weight_dq is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or \
            weight_q is None or weight_q.op_type != "QuantizeLinear":
        return None
    per_channel = index.constant(weight_q.input[1])
    axis = next((a.i for a in weight_q.attribute if a.name == "axis"), 1)
    init = index.initializers.get(weight_q.input[0])
    if init is None or len(index.readers[init.name]) != 1 or per_channel is None or \
            (per_channel.size > 1 and axis != 0):
        return None
    return dq, init


def pad_conv_input_channels(path: str | Path, multiple: int = 4) -> int:
    """Give every quantized convolution whose input channels are not a multiple of
    ``multiple`` zero channels up to one, in place; returns how many convolutions. The
    integer input is padded with its zero point (0 once dequantized) and the weights with
    zeros, so every output is unchanged; onnxruntime's symmetric-weight convolution kernels
    need the channels in fours; without them the RGB stem conv takes a generic path, about
    twice as slow for PIDNet-S's stem at 512x1024 on this project's CPU."""
    model = onnx.load(str(path))
    graph = model.graph
    index = _GraphIndex(graph)
    padded = 0
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        found = _paddable(conv, index)
        if found is None:
            continue
        dq, init = found
        weight = onnx.numpy_helper.to_array(init)
        extra = -weight.shape[1] % multiple
        if extra == 0:
            continue
        zeros = np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)
        init.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([weight, zeros], 1),
                                                   init.name))
        prefix = f"{conv.name or conv.output[0]}_padded_input"
        pads = np.zeros(2 * weight.ndim, np.int64)
        pads[weight.ndim + 1] = extra                  # the end of the channel axis
        graph.initializer.append(onnx.numpy_helper.from_array(pads, f"{prefix}/pads"))
        pad = onnx.helper.make_node("Pad", [dq.input[0], f"{prefix}/pads", dq.input[2]],
                                    [f"{prefix}/pad"], mode="constant", name=f"{prefix}/pad")
        if len(index.readers[dq.output[0]]) == 1:      # the conv's own: it reads the padding
            dq.input[0] = pad.output[0]
            _insert_before(graph, dq, pad)
        else:                                          # shared: the conv gets its own copy
            copy = onnx.helper.make_node("DequantizeLinear", [pad.output[0], *dq.input[1:]],
                                         [f"{prefix}/dq"], name=f"{prefix}/dq")
            copy.attribute.extend(dq.attribute)
            conv.input[0] = copy.output[0]
            _insert_before(graph, conv, pad, copy)
        padded += 1
    onnx.save(model, str(path))
    return padded


def weights_to_int8(path: str | Path) -> int:
    """Store every quantized weight as its integers, in place: each QuantizeLinear of a
    constant float weight is computed here (``x / scale`` in float32, rounded half to even,
    plus the zero point, saturated: ONNX's definition) and its DequantizeLinear reads the
    integer initializer, as onnxruntime's quantizer and TensorRT's samples write weights.
    The graph computes the same function bit for bit and is about a quarter of the size.
    Returns how many weights were converted."""
    model = onnx.load(str(path))
    graph = model.graph
    index = _GraphIndex(graph)
    converted = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]:
        weight, scale, zero = (index.constant(name) for name in q.input[:3])
        if weight is None or scale is None or zero is None or weight.dtype != np.float32:
            continue
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if scale.size > 1:                    # per channel: broadcast along the axis
            shape = [1] * weight.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        integers = np.rint(weight / scale.astype(np.float32)) + zero.astype(np.float32)
        integers = np.clip(integers, info.min, info.max).astype(zero.dtype)
        name = f"{q.input[0]}_quantized"
        graph.initializer.append(onnx.numpy_helper.from_array(integers, name))
        for reader in index.readers[q.output[0]]:
            for i, tensor in enumerate(reader.input):
                if tensor == q.output[0]:
                    reader.input[i] = name
        graph.node.remove(q)
        converted += 1
    _remove_unused_initializers(graph)
    onnx.save(model, str(path))
    return converted


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | \
        {out.name for out in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def rewrite_for_onnxruntime(path: str | Path) -> dict[str, int]:
    """The exported INT8 graph in the form onnxruntime's CPU kernels run fastest, in place;
    every rewrite keeps the outputs (see each): uint8 activations, integer depthwise
    convolutions for the affine float islands, input channels in fours. Returns how many of
    each were made."""
    return {"activations_as_uint8": activations_to_uint8(path),
            "affine_ops_as_depthwise": affine_ops_to_depthwise(path),
            "convs_with_padded_input_channels": pad_conv_input_channels(path)}
