"""``export_onnx.py``: a quantized checkpoint as ``float.onnx`` and ``int8.onnx`` (Q/DQ), checked
in onnxruntime against the PyTorch fake-quant model and timed float against INT8.

The graphs are the inference form (one output: the main prediction) with batch norm folded
into the convolution before it. The Q/DQ nodes sit where the quantizers were placed when they
were inserted (``export.target``): exporting a checkpoint for another target is an error.
"""
from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from . import layer_check, quant, runtime
from .checkpoint import read_checkpoint
from .cli import base_parser, run_cli
from .config import Config
from .batches import describe
from .engine import pick_metric, to_device
from .errors import InputError, QualityGateError
from .metrics import predicted_labels
from .pipeline import (FixedBatches, build_criterion, check_quantized, evaluate_model,
                       example_input, pairs, restore_checkpoint, start_session)
from .plots import plot_layer_check
from .reports import format_table, write_csv, write_json

logger = logging.getLogger(__name__)


class MainOutput(nn.Module):
    """The inference form: one tensor out, the prediction ``pick`` finds among the model's
    outputs (PIDNet's main logits, its auxiliary heads off; ``'out'`` of a torchvision
    segmentation model)."""

    def __init__(self, model: nn.Module, pick: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.pick = model, pick
        if isinstance(getattr(model, "augment", None), bool):
            model.augment = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(x))


class Resized:
    """Val batches with their images resized (bilinear) to the deployed ``size``, in the
    loader's own form (a pair, or a dict with the images under ``key``); the targets are kept
    (an ``evaluate`` that resizes its logits to the labels scores them as usual)."""

    def __init__(self, batches: Any, size: list[int], key: str | None) -> None:
        self.batches, self.size, self.key = batches, size, key
        self.dataset = getattr(batches, "dataset", None)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(images, size=self.size, mode="bilinear",
                                               align_corners=False)

    def __iter__(self):
        for batch in self.batches:
            if isinstance(batch, dict):
                yield {**batch, self.key: self._resize(batch[self.key])}
            else:
                inputs, targets = batch
                yield self._resize(inputs), targets

    def __len__(self) -> int:
        return len(self.batches)


def _read_checkpoint(cfg: Config) -> dict[str, Any]:
    """Before any work: model_path is a quantized checkpoint placed for ``export.target``."""
    if cfg.model_path is None:
        raise InputError("export_onnx.py needs model_path: a quantized checkpoint from "
                         "calibrate.py, qat_train.py or sensitivity_analysis.py")
    ckpt = check_quantized(read_checkpoint(cfg.model_path), cfg.model_path, cfg.export.target)
    placed = ckpt.get("config", {}).get("quant", {})
    weight_bits, act_bits = placed.get("weight_bits", 8), placed.get("act_bits", 8)
    if (weight_bits, act_bits) != (8, 8):
        raise InputError(f"{cfg.model_path} is quantized at {weight_bits}-bit weights and "
                         f"{act_bits}-bit activations; export_onnx.py writes INT8 graphs: "
                         "calibrate or train with quant.weight_bits=8 and quant.act_bits=8")
    return ckpt


def trtexec_commands(out: Any, cfg: Config, shape: list[int]) -> dict[str, str]:
    """What a TensorRT user runs on each graph (INT8 from the Q/DQ nodes, FP16 for float)."""
    shapes = ""
    if cfg.export.dynamic_batch:
        dims = "x".join(str(d) for d in shape)
        shapes = f" --minShapes=input:1x{dims[dims.index('x') + 1:]} --optShapes=input:{dims}" \
                 f" --maxShapes=input:{dims}"
    return {"int8": f"trtexec --onnx={out / 'int8.onnx'} --int8 --fp16{shapes} "
                    f"--saveEngine={out / 'int8.engine'}",
            "float": f"trtexec --onnx={out / 'float.onnx'} --fp16{shapes} "
                     f"--saveEngine={out / 'float_fp16.engine'}"}


@torch.no_grad()
def output_form(model: nn.Module, x: torch.Tensor, predict: Callable[[Any], torch.Tensor]
                ) -> Callable[[torch.Tensor], Any] | None:
    """How the graph's one output is handed to the hooks' criterion and ``evaluate``: in a
    dict under the key the model returns its prediction by (``{'out': logits}``), else as it
    is (PIDNet's inference form returns the logits alone)."""
    outputs = model.eval()(x)
    prediction = predict(outputs)
    if isinstance(outputs, dict):
        key = next((k for k, v in outputs.items() if v is prediction), None)
        if key is not None:
            return lambda logits: {key: logits}
    return None


def polygraphy_command(out: Any) -> str:
    """What a TensorRT user runs on a GPU to compare TensorRT with onnxruntime on the INT8
    graph, every tensor marked as an output (NVIDIA's Polygraphy, on PyPI)."""
    return (f"polygraphy run {out / 'int8.onnx'} --trt --int8 --onnxrt --trt-outputs mark all "
            "--onnx-outputs mark all --fail-fast --atol 1e-2 --rtol 1e-2")


def _export(args: argparse.Namespace) -> None:
    checked: dict[str, Any] = {}     # the checkpoint, read once while checking the inputs
    session = start_session(
        args, default_output="runs/export", force=args.force, resumable=False,
        validate=lambda cfg, hooks: checked.update(ckpt=_read_checkpoint(cfg)))
    cfg, out, exp = session.cfg, session.out, session.cfg.export
    model = restore_checkpoint(session, checked["ckpt"]).eval()
    criterion = build_criterion(session)
    batches = FixedBatches.val(session, exp.eval_batches)
    first = to_device(example_input(session, batches), torch.device("cpu"))
    if not isinstance(first, torch.Tensor):
        raise InputError("export_onnx.py writes graphs with one image input; the val "
                         f"loader's inputs are {describe(first)}")
    if exp.input_size is not None and list(first.shape[-2:]) != exp.input_size:
        # the check runs at the deployed size
        batches = Resized(batches, exp.input_size, cfg.batch.inputs)
        first = to_device(example_input(session, batches), torch.device("cpu"))
    shape = [exp.batch, *first.shape[1:]]
    example = first[:1].expand(*shape).contiguous()
    predict = lambda outputs: session.hooks.prediction(outputs, cfg)

    deployed = MainOutput(copy.deepcopy(model).cpu(), predict).eval()
    folded = quant.fold_batch_norms(deployed, example)
    float_graph = copy.deepcopy(deployed)
    quant.disable_all(float_graph)
    paths = {"float": quant.export_onnx(float_graph, example, out / "float.onnx", exp.opset,
                                        exp.dynamic_batch),
             "int8": quant.export_onnx(deployed, example, out / "int8.onnx", exp.opset,
                                       exp.dynamic_batch)}
    rewrites: dict[str, int] = {}
    if exp.target == "onnxruntime":   # TensorRT's INT8 is signed: its graph keeps int8
        rewrites = runtime.rewrite_for_onnxruntime(paths["int8"])
        logger.info("rewritten for onnxruntime: %s",
                    ", ".join(f"{what.replace('_', ' ')}: {n}" for what, n in rewrites.items()))
    rewrites["weights_as_int8"] = runtime.weights_to_int8(paths["int8"])
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    logger.info("wrote %s and %s (%d batch norms folded; %.1f MB and %.1f MB, weights stored "
                "as INT8)", paths["float"], paths["int8"], len(folded), sizes["float"] / 1e6,
                sizes["int8"] / 1e6)

    # layer by layer: every quantized tensor of the graph against PyTorch's, on one batch
    layers = layer_check.compare_layers(deployed, paths["int8"], example, exp.threads)
    write_csv(out / "layers.csv", layers)
    plot_layer_check(layers, exp.max_step_mismatch, out / "layers.png")
    diverged = layer_check.first_divergence(layers, exp.max_step_mismatch)
    worst = sorted(layers, key=lambda r: -r["off_by_more_than_one_step"])[:3]
    if diverged is not None:
        logger.warning("first divergence: %s (%s; every tensor in %s)",
                       layer_check.describe(diverged), diverged["onnx_tensor"],
                       out / "layers.csv")
    else:
        logger.info("layer check: %d quantized tensors, each within one quantization step of "
                    "PyTorch on at least %.1f%% of its elements (worst: %s)", len(layers),
                    100 * (1 - exp.max_step_mismatch),
                    layer_check.describe(worst[0]) if worst else "none compared")

    static_batch = None if exp.dynamic_batch else exp.batch
    form = output_form(model, first[:1].to(session.device), predict)
    graphs = {k: runtime.OrtModel(runtime.session(p, exp.threads), static_batch, form)
              for k, p in paths.items()}
    # the same INT8 graph with onnxruntime's optimizer off: no Q/DQ fusion, every op in float
    # between QuantizeLinear / DequantizeLinear, i.e. the graph's fake-quant function as written
    unfused = runtime.OrtModel(runtime.session(paths["int8"], exp.threads,
                                               level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                               static_batch, form)
    # argmax agreement of onnxruntime's INT8 graph with the checkpoint's fake-quant model, and
    # two floors that tell where a miss comes from: the graph run without integer kernels (a
    # wrong graph shows here), and PyTorch's own batch-norm-folded model (the same function up
    # to float rounding: how far rounding flips alone move this model's argmax). Counted on the
    # input's pixels, dense logits resized to it as the metric scores them
    agree = {"onnxruntime_int8": 0, "onnxruntime_unfused": 0, "pytorch_folded": 0}
    total = 0
    with torch.no_grad():
        for inputs, _ in pairs(session, batches):
            inputs = to_device(inputs, torch.device("cpu"))
            size = inputs.shape[-2:]
            reference = predicted_labels(predict(model(inputs.to(session.device))).cpu(), size)
            for key, prediction in (("onnxruntime_int8", predict(graphs["int8"](inputs))),
                                    ("onnxruntime_unfused", predict(unfused(inputs))),
                                    ("pytorch_folded", deployed(inputs))):
                agree[key] += int((reference == predicted_labels(prediction.cpu(), size)).sum())
            total += reference.numel()
    agreement = agree["onnxruntime_int8"] / total
    unfused_agreement = agree["onnxruntime_unfused"] / total
    folded_agreement = agree["pytorch_folded"] / total
    scores = {"pytorch_fake_quant": evaluate_model(session, model, batches, criterion),
              "onnxruntime_int8": evaluate_model(session, graphs["int8"], batches, criterion),
              "onnxruntime_float": evaluate_model(session, graphs["float"], batches, criterion)}
    name, higher = pick_metric(scores["pytorch_fake_quant"], cfg.metric)
    drop = scores["pytorch_fake_quant"][name] - scores["onnxruntime_int8"][name]
    drop = drop if higher else -drop
    ops = runtime.optimized_ops(paths["int8"], exp.threads)
    latency = runtime.paired_latency(paths, tuple(shape), exp.threads, exp.latency_runs)
    commands = trtexec_commands(out, cfg, shape)

    rows = [{"graph": k, name: v[name]} for k, v in scores.items()]
    print(format_table(rows, ["graph", name]))
    print(f"{name} of onnxruntime INT8 {'below' if drop >= 0 else 'above'} PyTorch fake-quant "
          f"by {abs(drop):.2f} (gate: at most {exp.max_metric_drop} below)")
    agreement_gate = "off" if exp.min_agreement is None else f"{exp.min_agreement:.2%}"
    print(f"argmax agreement, onnxruntime INT8 vs PyTorch fake-quant: {agreement:.4%} "
          f"(gate {agreement_gate}; the same graph without integer kernels: "
          f"{unfused_agreement:.4%}; PyTorch alone with batch norm folded: "
          f"{folded_agreement:.4%})")
    print(f"layer check: {len(layers)} quantized tensors compared, first divergence: "
          f"{layer_check.describe(diverged) if diverged else 'none'}")
    print(f"integer convolutions: {ops['integer_convs']} of {ops['all_convs']}; quantizable "
          f"ops left in float: {ops['float'] or 'none'}")
    float_convs = [n for kind in ("Conv", "FusedConv") for n in ops["float_nodes"].get(kind, [])]
    if float_convs and exp.target == "onnxruntime":
        print(f"convolutions left in float ({len(float_convs)}; all in results.json, "
              f"optimized_int8_graph.float_nodes): {', '.join(float_convs[:4])}"
              f"{', ...' if len(float_convs) > 4 else ''}")
    print(f"latency, onnxruntime CPU, {exp.threads} threads: float "
          f"{latency['median_ms']['float']:.1f} ms, INT8 {latency['median_ms']['int8']:.1f} ms "
          f"({latency['speedup_over_float']['int8']:.2f}x)")
    for line in commands.values():
        print(line)
    polygraphy = polygraphy_command(out)
    if exp.target == "tensorrt":
        print(polygraphy)
    results = {"script": "export_onnx", "target": exp.target, "metric": name,
               "graphs": {k: str(p) for k, p in paths.items()}, "input_shape": shape,
               "dynamic_batch": exp.dynamic_batch, "opset": exp.opset,
               "folded_batch_norms": len(folded), "onnxruntime_rewrites": rewrites,
               "int8_weights": True, "file_bytes": sizes,
               "metric_drop": drop, "max_metric_drop": exp.max_metric_drop,
               "agreement": agreement,
               "min_agreement": exp.min_agreement, "pixels_compared": total,
               "agreement_unfused_onnxruntime": unfused_agreement,
               "agreement_folded_pytorch": folded_agreement,
               "metrics": {k: v[name] for k, v in scores.items()},
               "layer_check": {"tensors": len(layers), "threshold": exp.max_step_mismatch,
                               "first_divergence": diverged, "worst": worst,
                               "onnx_tensors": {r["quantizer"]: r["onnx_tensor"]
                                                for r in layers},
                               "table": str(out / "layers.csv"),
                               "plot": str(out / "layers.png")},
               "optimized_int8_graph": ops, "latency": latency, "trtexec": commands,
               "polygraphy": polygraphy}
    print(write_json(out / "results.json", results))
    where = f"; first divergence: {layer_check.describe(diverged)}" if diverged else ""
    if drop > exp.max_metric_drop:
        raise QualityGateError(f"onnxruntime's INT8 {name} is {drop:.2f} below PyTorch's, more "
                               f"than export.max_metric_drop {exp.max_metric_drop}{where}")
    if exp.min_agreement is not None and agreement < exp.min_agreement:
        raise QualityGateError(f"onnxruntime's INT8 argmax agrees with PyTorch's on "
                               f"{agreement:.4%} of pixels, below export.min_agreement "
                               f"{exp.min_agreement}{where}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("Export a quantized checkpoint to ONNX (float and INT8 Q/DQ), check it "
                         "in onnxruntime and time it.", prog="export_onnx.py")
    return run_cli(_export, parser, argv)
