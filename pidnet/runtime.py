"""Running exported graphs in onnxruntime: sessions, outputs, what its optimizer made of the
Q/DQ nodes, and float-vs-INT8 latency measured in one interleaved run."""
from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
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
    the batch in slices (the last one padded)."""

    def __init__(self, sess: ort.InferenceSession, batch: int | None) -> None:
        super().__init__()
        self.sess, self.batch = sess, batch
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    quantizable ops left in float."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, threads, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        graph = onnx.load(str(out)).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    return {"integer": {k: counts[k] for k in INTEGER_OPS if counts[k]},
            "float": {k: counts[k] for k in QUANTIZABLE if counts[k]},
            "quantize_linear": counts["QuantizeLinear"],
            "dequantize_linear": counts["DequantizeLinear"],
            "integer_convs": counts["QLinearConv"] + counts["ConvInteger"],
            "all_convs": counts["QLinearConv"] + counts["ConvInteger"] + counts["Conv"]
            + counts["FusedConv"]}


def paired_latency(paths: dict[str, str | Path], shape: tuple[int, ...], threads: int,
                   runs: int, block: int = 5, settle: int = 2, seed: int = 0
                   ) -> dict[str, Any]:
    """Median latency of each graph on the same random input, and the median over rounds of
    the first graph's time over each graph's (its speedup), with the graphs interleaved so
    machine noise hits them alike.

    Graphs take turns in blocks of ``settle`` untimed and ``block`` timed back-to-back runs
    (the order reversed every round), about ``runs`` timed runs each. Switching sessions costs
    the next runs (caches refilled, the other session's worker threads still spinning): run by
    run, PIDNet-S at 128x256 timed 17-27 ms float and 9-14 ms INT8, against 6.9 and 3.5 ms
    back to back, which is how a deployed model runs."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = random_input(shape, seed)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    names = list(sessions)
    rounds: list[dict[str, float]] = []
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(1 + -(-runs // block)):          # round 0 warms every session up
        medians = {}
        for name in names if i % 2 else names[::-1]:
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


def activations_to_uint8(path: str | Path) -> int:
    """Rewrite every per-tensor int8 activation Q/DQ pair (zero point 0) of the ONNX file as
    uint8 with zero point 128, in place; returns how many. The grid is the same (q + 128), so
    outputs are bit-identical, but every activation now has onnxruntime's preferred type:
    integer kernels with inputs of one type fuse (QLinearAdd needs both inputs and the output
    alike; ReLU outputs are uint8 already) and convolutions take the u8s8 path on x86."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return onnx.numpy_helper.to_array(initializers[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return onnx.numpy_helper.to_array(node.attribute[0].t)
        return None

    converted = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]:
        if constant(q.input[0]) is not None:          # a weight: stays int8
            continue
        zero = constant(q.input[2])
        if zero is None or zero.dtype != np.int8 or zero.size != 1 or zero.item() != 0:
            continue
        name = f"{q.output[0]}_zero_point_u8"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(128, np.uint8), name))
        q.input[2] = name
        for dq in readers[q.output[0]]:
            if dq.op_type == "DequantizeLinear":
                dq.input[2] = name
        converted += 1
    onnx.save(model, str(path))
    return converted
