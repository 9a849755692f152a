"""export_onnx.py on a small residual conv net for both targets, and on the fragile model
through sensitivity_analysis.py's output."""
from __future__ import annotations

import copy
import csv
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pidnet import quant, runtime
from pidnet.calibrate import main as calibrate_main
from pidnet.config import QuantConfig, load_config
from pidnet.data import SyntheticScenes
from pidnet.engine import main_prediction
from pidnet.export_onnx import main as export_main
from pidnet.hooks import load_hooks
from pidnet.model import create_model
from pidnet.pipeline import Session, load_quantized
from pidnet.sensitivity_analysis import main as sensitivity_main

from .helpers import TINY_HOOKS, TINY_NET_USER, tiny_config
from .test_sensitivity import legacy_config


def _calibrated(tmp_path, weights, target, **extra):
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER, model_path=str(weights),
                      calib={"num_batches": 2, "methods": ["max"]},
                      export={"target": target, "latency_runs": 3}, **extra)
    assert calibrate_main(["--config", str(cfg), "--set", f"output_dir={tmp_path / 'cal'}"]) == 0
    return cfg, tmp_path / "cal" / "quantized.pt"


class Graph:
    def __init__(self, path):
        self.model = onnx.load(str(path))
        self.nodes = list(self.model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}

    def op(self, tensor):
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def ops(self, kind):
        return [n for n in self.nodes if n.op_type == kind]

    def constant(self, tensor):
        if tensor in self.inits:
            return self.inits[tensor]
        node = self.producer[tensor]
        return numpy_helper.to_array(node.attribute[0].t)

    def readers(self, tensor):
        return [n.op_type for n in self.consumers.get(tensor, [])]


def _weight_dq_axes(graph: Graph) -> list[tuple[int, int]]:
    """(axis, number of scales) of every DequantizeLinear feeding a Conv's weight."""
    found = []
    for conv in graph.ops("Conv"):
        dq = graph.producer.get(conv.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", conv.name
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        found.append((axis, graph.constant(dq.input[1]).size))
    return found


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_export_places_qdq_by_target_and_matches_pytorch(tmp_path, tiny_float_weights, target):
    cfg, ckpt = _calibrated(tmp_path, tiny_float_weights, target)
    assert export_main(["--config", str(cfg), "--set", f"model_path={ckpt}"]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["agreement"] >= 0.995
    assert results["metric_drop"] <= results["max_metric_drop"] == 0.3
    # layer by layer: every quantized tensor within one step on at least 99% of its elements
    check = results["layer_check"]
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert check["first_divergence"] is None and len(rows) == check["tensors"] >= 9
    assert all(float(r["off_by_more_than_one_step"]) <= 0.01 for r in rows)
    assert {r["kind"] for r in rows} == {"weight", "activation"}
    assert check["onnx_tensors"]["model.head.weight_quantizer"].endswith(
        "/head/weight_quantizer/DequantizeLinear_output_0")
    assert (out / "layers.png").stat().st_size > 0
    # the graph's own function (no integer kernels) and PyTorch's folded model agree too
    assert results["agreement_unfused_onnxruntime"] >= 0.995
    assert results["agreement_folded_pytorch"] >= 0.995
    # counted on the 8 val images' pixels, as the metric scores them: the logits (a quarter
    # of the input per side) resized to 64x128 first
    assert results["pixels_compared"] == 8 * 64 * 128
    assert results["folded_batch_norms"] == 3          # every conv but the head
    latency = results["latency"]          # 3 runs asked: one block of 10 timed runs per graph
    assert latency["runs"] == 10 and latency["speedup_over_float"]["float"] == 1.0
    assert set(latency["median_ms"]) == {"float", "int8"}
    ops = runtime.op_times(out / "int8.onnx", (1, 3, 64, 128), 1, runs=2)
    integer = "QLinearConv" if target == "onnxruntime" else "Conv"
    assert ops[integer] > 0 and list(ops.values()) == sorted(ops.values(), reverse=True)
    graph = Graph(out / "int8.onnx")
    assert graph.ops("QuantizeLinear") and graph.ops("DequantizeLinear")
    for axis, scales in _weight_dq_axes(graph):            # per output channel, axis 0
        assert axis == 0 and scales > 1
    assert not [n for n in graph.ops("BatchNormalization") if graph.op(n.input[0]) == "Conv"]
    assert not Graph(out / "float.onnx").ops("QuantizeLinear")
    (add,) = graph.ops("Add")
    sources = sorted(str(graph.op(i)) for i in add.input)
    if target == "tensorrt":
        # the skip input carries the Q/DQ pair; the conv feeding the add stays free to fuse
        assert sources == ["Conv", "DequantizeLinear"]
        assert "QuantizeLinear" not in graph.readers(add.output[0])
        assert all("QuantizeLinear" not in graph.readers(c.output[0]) for c in graph.ops("Conv"))
    else:
        # every conv and add output is quantized (after the ReLU where one follows)
        assert sources == ["DequantizeLinear", "DequantizeLinear"]
        for node in graph.ops("Conv") + [add]:
            readers = graph.readers(node.output[0])
            if readers == ["Relu"]:
                readers = graph.readers(graph.consumers[node.output[0]][0].output[0])
            assert readers == ["QuantizeLinear"], node.name
        assert results["optimized_int8_graph"]["integer_convs"] == 4
        assert results["optimized_int8_graph"]["float"] == {}

    # onnxruntime's outputs are PyTorch's fake-quant outputs to within one quantization step
    config = load_config(cfg, [f"model_path={ckpt}"])
    session = Session(config, out, load_hooks(config.hooks), torch.device("cpu"))
    model = load_quantized(session, ckpt).eval()
    sess = runtime.session(out / "int8.onnx", 2)
    images, _ = next(iter(session.hooks.get_data_loader(config, "val")))
    with torch.no_grad():
        want = main_prediction(model(images))
    got = torch.cat([runtime.run(sess, images[i:i + 1]) for i in range(len(images))])
    if target == "onnxruntime":     # the head's output is quantized: one step of its range
        step = float(model.head.output_quantizer.amax) / 127
    else:                           # one step of the head's input through its weights
        step = float(model.head.input_quantizer.amax) / 127 * float(
            model.head.weight.detach().abs().sum(dim=(1, 2, 3)).max())
    within = ((got - want).abs() <= step + 1e-5).float().mean()
    assert within >= 0.99, float(within)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_pidnet_ops_between_convolutions_follow_the_target(tmp_path, target):
    """PIDNet-S's gates, products, resizes, concatenations and pooling carry quantizers at
    their producers under the onnxruntime placement, so onnxruntime's optimized graph runs
    them as integer kernels; only the pixel attention's dot product and sigmoid stay float by
    design (two of each). The tensorrt placement gives them no quantizers."""
    torch.manual_seed(0)
    weights = tmp_path / "float.pt"
    torch.save(create_model("pidnet_s", SyntheticScenes.num_classes).state_dict(), weights)
    cfg = tiny_config(tmp_path, model_path=str(weights), export={"target": target,
                                                                 "latency_runs": 3},
                      calib={"num_batches": 1, "methods": ["max"]})
    assert calibrate_main(["--config", str(cfg), "--set", f"output_dir={tmp_path / 'cal'}"]) == 0
    # an untrained network's argmax is fragile: the agreement gate may fail (exit 3)
    assert export_main(["--config", str(cfg), "--set",
                        f"model_path={tmp_path / 'cal' / 'quantized.pt'}"]) in (0, 3)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    graph = results["optimized_int8_graph"]
    between = {"Mul": 8, "Sigmoid": 3, "Concat": 2, "AveragePool": 3, "GlobalAveragePool": 1}
    if target == "onnxruntime":
        attention = {"Mul": 2, "Sigmoid": 2}
        assert graph["float"] == attention
        # the 9 batch norms after no convolution (PAPPM 8, head 1) and the 3 complements run
        # as integer depthwise convolutions beside the model's 75
        assert results["onnxruntime_rewrites"]["affine_ops_as_depthwise"] == 12
        exported = Graph(tmp_path / "run" / "int8.onnx")
        assert not exported.ops("BatchNormalization") and not exported.ops("Sub")
        assert graph["integer_convs"] == graph["all_convs"] == 75 + 12
        assert graph["integer"] == {"QLinearConv": 75 + 12, "QLinearAdd": 32, **{
            f"QLinear{op}": n - attention.get(op, 0) for op, n in between.items()}}
    else:
        assert {op: graph["float"].get(op) for op in between} == between
    if target == "onnxruntime":
        # one quantizer per call site (relu, relu_1, ... relu_7): the exporter names their scopes
        # by the module's own name with counters of its own; the layer check still pairs each
        # with its own tensor (by execution order; the name pairing put relu 250 steps off).
        # Random weights amplify rounding with depth: the first tensors are within a few steps
        with (tmp_path / "run" / "layers.csv").open() as f:
            rows = {r["quantizer"]: r for r in csv.DictReader(f)}
        assert len(rows) >= 200
        assert len([n for n in rows if n.startswith("model.relu")]) == 8
        for name in ("model.conv1.0.input_quantizer", "model.layer1.0.relu.output_quantizer",
                     "model.relu.output_quantizer", "model.relu_1.output_quantizer"):
            assert float(rows[name]["max_steps_off"]) <= 5, name
    # weights stored as INT8: the file is about a quarter of the float graph's
    sizes = results["file_bytes"]
    assert sizes["int8"] <= 0.3 * sizes["float"]
    assert not [n for n in Graph(tmp_path / "run" / "int8.onnx").ops("QuantizeLinear")
                if n.input[0].startswith("model.")]          # no float weight behind a Q


def test_float_checkpoint_and_other_target_are_one_line_errors(tmp_path, tiny_float_weights,
                                                               capsys):
    cfg, ckpt = _calibrated(tmp_path, tiny_float_weights, "tensorrt")
    assert calibrate_main(["--config", str(cfg), "--set", f"output_dir={tmp_path / 'w4'}",
                           "--set", "quant.weight_bits=4"]) == 0
    capsys.readouterr()
    for model_path, target, expected in ((tiny_float_weights, "tensorrt", "float weights"),
                                         (ckpt, "onnxruntime", "export.target=onnxruntime"),
                                         (tmp_path / "w4" / "quantized.pt", "tensorrt",
                                          "quant.weight_bits=8")):
        assert export_main(["--config", str(cfg), "--set", f"model_path={model_path}",
                            "--set", f"export.target={target}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "run").exists()


def test_layers_kept_float_by_sensitivity_stay_float_in_the_graph(tmp_path):
    cfg = legacy_config(tmp_path, export={"latency_runs": 3})
    assert sensitivity_main(["--config", str(cfg)]) == 0
    assert export_main(["--config", str(cfg), "--set",
                        f"model_path={tmp_path / 'run' / 'kept_float.pt'}",
                        "--set", f"output_dir={tmp_path / 'export'}"]) == 0
    graph = Graph(tmp_path / "export" / "int8.onnx")
    gemms = [n for n in graph.nodes if n.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 3                                   # expand, fragile, head in order
    fed_by_dq = [graph.op(n.input[0]) == "DequantizeLinear" and
                 graph.op(n.input[1]) == "DequantizeLinear" for n in gemms]
    assert fed_by_dq == [True, False, True]
    results = json.loads((tmp_path / "export" / "results.json").read_text())
    assert results["agreement"] >= 0.995 and results["metric"] == "loss"
    assert np.isclose(results["metrics"]["onnxruntime_int8"],
                      results["metrics"]["pytorch_fake_quant"], rtol=1e-3)


def test_uint8_activations_give_identical_outputs(tmp_path, tiny_float_weights):
    """The onnxruntime rewrite of int8 activation Q/DQ pairs to uint8 (zero point 128) keeps
    every output bit-identical and leaves the weights int8."""
    import shutil

    cfg, ckpt = _calibrated(tmp_path, tiny_float_weights, "tensorrt")
    assert export_main(["--config", str(cfg), "--set", f"model_path={ckpt}"]) == 0
    signed = tmp_path / "run" / "int8.onnx"
    unsigned = tmp_path / "u8.onnx"
    shutil.copy(signed, unsigned)
    before = Graph(signed)
    activations = [q for q in before.ops("QuantizeLinear") if q.input[0] not in before.inits]
    assert runtime.activations_to_uint8(unsigned) == len(activations) == 5
    graph = Graph(unsigned)
    for q in graph.ops("QuantizeLinear"):
        weight = q.input[0] in graph.inits
        assert graph.constant(q.input[2]).dtype == (np.int8 if weight else np.uint8)
    for conv in graph.ops("Conv"):
        weight_dq = graph.producer[conv.input[1]]
        assert graph.constant(weight_dq.input[2]).dtype == np.int8
    x = torch.randn(1, 3, 64, 128)
    assert torch.equal(runtime.run(runtime.session(signed, 1), x),
                       runtime.run(runtime.session(unsigned, 1), x))


def _save_graph(path, nodes, inputs, outputs, inits):
    """A hand-built opset-17 graph (``inits``: name -> array) written to ``path``."""
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _affine_island_graph(path, shape=(1, 4, 8, 8)):
    """input -> Q/DQ -> BatchNormalization -> Relu -> Q/DQ -> out_bn, and the same DQ ->
    1 - x -> Q/DQ -> out_complement, -> HardSigmoid -> unsigned Q/DQ in [0, 1] -> out_gate,
    and two left float: a BatchNormalization read in float -> out_float, a HardSigmoid whose
    output quantizer is signed (it cannot clip at 0) -> out_signed_gate. The float islands
    onnxruntime runs as DequantizeLinear, a float op, QuantizeLinear."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    channels = shape[1]
    gamma = (rng.uniform(0.2, 2.0, channels) * rng.choice([-1, 1], channels)).astype(np.float32)
    inits = {"x_scale": np.float32(0.05), "x_zero": np.uint8(128),
             "gamma": gamma, "beta": rng.normal(size=channels).astype(np.float32),
             "mean": rng.normal(size=channels).astype(np.float32),
             "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
             "y_scale": np.float32(0.03), "y_zero": np.uint8(0), "c_zero": np.uint8(128),
             "one": np.float32(1.0), "g_scale": np.float32(0.00391), "g_zero": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["x"]),
             helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"],
                              ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["relu"]),
             helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zero"], ["bnq"]),
             helper.make_node("DequantizeLinear", ["bnq", "y_scale", "y_zero"], ["out_bn"]),
             helper.make_node("Sub", ["one", "x"], ["complement"], name="complement"),
             helper.make_node("QuantizeLinear", ["complement", "x_scale", "c_zero"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "x_scale", "c_zero"],
                              ["out_complement"]),
             helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"],
                              ["out_float"], name="bn_read_in_float"),
             helper.make_node("HardSigmoid", ["x"], ["gate"], alpha=1 / 6, beta=0.5),
             helper.make_node("QuantizeLinear", ["gate", "g_scale", "g_zero"], ["gq"]),
             helper.make_node("DequantizeLinear", ["gq", "g_scale", "g_zero"], ["out_gate"]),
             helper.make_node("HardSigmoid", ["x"], ["signed"], name="signed_gate"),
             helper.make_node("QuantizeLinear", ["signed", "x_scale", "c_zero"], ["sq"]),
             helper.make_node("DequantizeLinear", ["sq", "x_scale", "c_zero"],
                              ["out_signed_gate"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
               for n in ("out_bn", "out_complement", "out_float", "out_gate", "out_signed_gate")]
    _save_graph(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                outputs, inits)
    return inits


def test_affine_float_islands_become_exact_integer_depthwise_convolutions(tmp_path):
    """A batch norm after no convolution (through a ReLU), ``1 - x`` and a hard sigmoid whose
    unsigned [0, 1] output quantizer clips it, each between a DequantizeLinear and a
    QuantizeLinear, become 1x1 depthwise convolutions with int8 weights of +-127 (the
    per-channel factor exactly) that onnxruntime fuses into QLinearConv; their quantized
    outputs equal the float islands' to one step. A batch norm read in float and a hard
    sigmoid with a signed output quantizer stay."""
    import onnxruntime as ort

    path, original = tmp_path / "islands.onnx", tmp_path / "original.onnx"
    inits = _affine_island_graph(path)
    _affine_island_graph(original)
    assert runtime.affine_ops_to_depthwise(path) == 3
    graph = Graph(path)
    assert [n.name for n in graph.ops("BatchNormalization")] == ["bn_read_in_float"]
    assert [n.name for n in graph.ops("HardSigmoid")] == ["signed_gate"]
    assert not graph.ops("Sub")
    convs = graph.ops("Conv")
    assert len(convs) == 3
    scale = inits["gamma"] / np.sqrt(inits["var"] + 1e-5)
    for conv, factor in zip(convs, (scale, -np.ones(4), np.full(4, 1 / 6))):
        assert {a.name: a.i for a in conv.attribute}["group"] == 4
        weight_dq = graph.producer[conv.input[1]]
        q = graph.constant(weight_dq.input[0]).ravel()
        assert set(np.abs(q)) == {127}
        w = q * graph.constant(weight_dq.input[1])
        np.testing.assert_allclose(w, factor, rtol=1e-6)
        assert graph.constant(graph.producer[conv.input[2]].input[0]).dtype == np.int32
    ops = runtime.optimized_ops(path, 1)
    assert ops["integer"] == {"QLinearConv": 3} and ops["integer_convs"] == 3
    flat = tmp_path / "flat.onnx"             # (N, C) tensors: no 1x1 convolution fits them
    _affine_island_graph(flat, shape=(1, 4))
    assert runtime.affine_ops_to_depthwise(flat) == 0

    x = torch.randn(1, 4, 8, 8) * 3
    reference = runtime.session(original, 1, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    want = reference.run(None, {"input": x.numpy()})
    got = runtime.session(path, 1).run(None, {"input": x.numpy()})
    for name, w, g, step in zip(("bn", "complement", "float", "gate", "signed gate"), want, got,
                                (inits["y_scale"], inits["x_scale"], 0, inits["g_scale"], 0)):
        assert np.abs(g - w).max() <= step + 1e-5, name
        assert (g == w).mean() >= 0.99, name


def _rgb_conv_graph(path):
    """input (3 channels) -> Q/DQ -> Conv (per-channel int8 weights) -> Q/DQ -> out, the same
    DQ also read by a Relu -> out_shared."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    inits = {"x_scale": np.float32(0.02), "x_zero": np.uint8(128), "w": weight,
             "w_scale": (np.abs(weight).max(axis=(1, 2, 3)) / 127).astype(np.float32),
             "w_zero": np.zeros(8, np.int8), "b": rng.normal(size=8).astype(np.float32),
             "y_scale": np.float32(0.05), "y_zero": np.uint8(128)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["x"]),
             helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["x", "wd", "b"], ["conv"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["out"]),
             helper.make_node("Relu", ["x"], ["out_shared"])]
    _save_graph(path, nodes,
                [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16]),
                 helper.make_tensor_value_info("out_shared", TensorProto.FLOAT, [1, 3, 16, 16])],
                inits)
    return weight


def test_rgb_conv_input_padded_to_four_channels_keeps_every_output(tmp_path):
    path, original = tmp_path / "padded.onnx", tmp_path / "original.onnx"
    weight = _rgb_conv_graph(path)
    _rgb_conv_graph(original)
    assert runtime.pad_conv_input_channels(path) == 1
    assert runtime.pad_conv_input_channels(path) == 0             # already in fours
    graph = Graph(path)
    padded = graph.inits["w"]
    assert padded.shape == (8, 4, 3, 3)
    assert np.array_equal(padded[:, :3], weight) and not padded[:, 3].any()
    (pad,) = graph.ops("Pad")
    assert list(graph.constant(pad.input[1])) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert graph.constant(pad.input[2]) == 128                   # the input's zero point
    assert graph.readers("x") == ["Relu"]                        # the other reader: unpadded
    assert runtime.optimized_ops(path, 1)["integer"] == {"QLinearConv": 1}
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    for want, got in zip(runtime.session(original, 1).run(None, {"input": x}),
                         runtime.session(path, 1).run(None, {"input": x})):
        assert np.array_equal(want, got)


def test_folding_a_negative_gamma_keeps_clipped_weights_on_the_trained_grid(tmp_path):
    """Clipped weight ranges (``weight_range: mse``, learned steps) leave weights beyond the
    range, and folding a negative gamma flips a channel's sign: in the graph every channel's
    integer weights are still the trained ones, negated where gamma is negative."""
    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                      torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        bn = float_model[1]
        bn.weight.copy_(torch.tensor([-1.5, 0.7, -0.4, 1.2]))
        bn.running_var.uniform_(0.5, 2.0)
    example = torch.randn(1, 3, 8, 8)
    model = quant.insert_quantizers(float_model, QuantConfig(), "onnxruntime", example)
    conv = model[0]
    w = conv.weight.detach().clone()
    wq = conv.weight_quantizer
    wq.amax = wq.amax * 0.5               # a clipped range: weights on both sides lie beyond it
    step = wq.amax / 127
    trained = torch.clamp(torch.round(w / step), -127, 127)
    assert bool((w / step < -127.5).any())
    assert torch.equal(torch.round(wq(w) / step), trained)        # the symmetric grid
    stats = quant.collect_stats(model, [(torch.randn(4, 3, 8, 8), None)], torch.device("cpu"))
    quant.apply_ranges(model, stats, "max")
    with torch.no_grad():
        want = model(example)
    assert quant.fold_batch_norms(model, example) == [("0", "1")]
    path = quant.export_onnx(model, example, tmp_path / "m.onnx", 17)
    graph = Graph(path)
    (weight_q,) = [q for q in graph.ops("QuantizeLinear") if q.input[0] in graph.inits]
    scale = graph.constant(weight_q.input[1]).reshape(-1, 1, 1, 1)
    integers = np.clip(np.round(graph.inits[weight_q.input[0]] / scale), -128, 127)
    sign = torch.sign(bn.weight.detach()).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(integers, (sign * trained).numpy())
    # and the exported model computes what the unfolded fake-quant model does
    got = runtime.run(runtime.session(path, 1), example)
    out_step = float(model[1].amax) / 127   # the batch norm's output quantizer took its place
    assert float((got - want).abs().max()) <= out_step + 1e-5


def _scale_weight(path, layer: str, factor: float) -> None:
    """Multiply one convolution's weights in the ONNX file by ``factor`` (its INT8 weights'
    scale, read by their DequantizeLinear): a graph broken on purpose."""
    model = onnx.load(str(path))
    nodes = {o: n for n in model.graph.node for o in n.output}
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
             and n.name == f"/model/{layer}/weight_quantizer/DequantizeLinear"]
    constant = nodes[dq.input[1]]
    scale = numpy_helper.to_array(constant.attribute[0].t)
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(scale * np.float32(factor)))
    onnx.save(model, str(path))


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_a_broken_graph_misses_the_metric_gate_and_names_its_layer(tmp_path, tiny_float_weights,
                                                                  monkeypatch, capsys, target):
    cfg, ckpt = _calibrated(tmp_path, tiny_float_weights, target)
    int8_weights = runtime.weights_to_int8

    def broken(path):
        converted = int8_weights(path)
        _scale_weight(path, "block/block.0", -1.0)
        return converted

    monkeypatch.setattr(runtime, "weights_to_int8", broken)
    assert export_main(["--config", str(cfg), "--set", f"model_path={ckpt}"]) == 3
    err = capsys.readouterr().err
    assert "max_metric_drop" in err and "first divergence: block.0 weight" in err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    first = results["layer_check"]["first_divergence"]
    assert first["quantizer"] == "model.block.0.weight_quantizer"
    assert first["off_by_more_than_one_step"] > 0.5
    assert results["metric_drop"] > 0.3
    # every tensor before it was computed as in PyTorch
    rows = list(csv.DictReader((tmp_path / "run" / "layers.csv").open()))
    before = rows[:int(first["index"])]
    assert before and all(float(r["off_by_more_than_one_step"]) <= 0.01 for r in before)


def test_int8_weight_initializers_compute_what_quantized_float_weights_did(
        tmp_path, tiny_float_weights, monkeypatch):
    cfg, ckpt = _calibrated(tmp_path, tiny_float_weights, "onnxruntime")
    monkeypatch.setattr(runtime, "weights_to_int8", lambda path: 0)   # the graph as before
    assert export_main(["--config", str(cfg), "--set", f"model_path={ckpt}"]) == 0
    before, after = tmp_path / "run" / "int8.onnx", tmp_path / "int8_weights.onnx"
    shutil.copy(before, after)
    monkeypatch.undo()
    assert runtime.weights_to_int8(after) == 4                    # every convolution's weights
    graph = Graph(after)
    weights = [graph.inits[graph.producer[c.input[1]].input[0]] for c in graph.ops("Conv")]
    assert [w.dtype for w in weights] == [np.int8] * 4
    assert after.stat().st_size < before.stat().st_size
    x = runtime.random_input((1, 3, 64, 128))
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        outputs = [runtime.session(p, 1, level=level).run(None, {"input": x})[0]
                   for p in (before, after)]
        assert np.array_equal(*outputs)


def test_per_tensor_weights_deploy_as_calibrated_or_are_refused(tmp_path, tiny_float_weights,
                                                                capsys):
    """Folding batch norm scales each output channel by its own factor: a per-tensor weight
    range would not survive it (the exported grid would not be the calibrated one), so a model
    whose export folds batch norm is refused per-tensor weights; one without deploys them as
    calibrated, the ONNX graph computing the fake-quant model's output."""
    cfg, _ = _calibrated(tmp_path, tiny_float_weights, "tensorrt")
    assert calibrate_main(["--config", str(cfg), "--set", "quant.per_channel=false",
                           "--set", f"output_dir={tmp_path / 'per_tensor'}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: config key 'quant.per_channel'") and "stem.0.1" in line

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(4, 3, 16, 16)
    model = quant.insert_quantizers(net, QuantConfig(per_channel=False), "tensorrt", x)
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")),
                       "max")
    weight_ranges = [m.weight_quantizer.amax for m in model if hasattr(m, "weight_quantizer")]
    assert [r.numel() for r in weight_ranges] == [1, 1]
    with torch.no_grad():
        want = model(x[:1])
    path = quant.export_onnx(copy.deepcopy(model), x[:1], tmp_path / "per_tensor.onnx", 17)
    scales = [Graph(path).constant(n.input[1]) for n in Graph(path).ops("DequantizeLinear")
              if n.name.endswith("weight_quantizer/DequantizeLinear")]
    assert [float(s) for s in scales] == pytest.approx([float(r) / 127 for r in weight_ranges])
    got = runtime.run(runtime.session(path, 1), x[:1])
    assert torch.allclose(got, want, atol=1e-5)
