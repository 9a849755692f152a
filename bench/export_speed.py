"""INT8 deployment speed of the exported PIDNet-S in onnxruntime (CPU), against the float graph
and against onnxruntime's own static quantization of the same float graph, in one run.

    python -m bench.export_speed --weights runs/float/best.pt [--qat runs/qat_ort/best.pt]

1. calibrate.py (the config's methods, the best on val kept, as a user runs it) with
   export.target=onnxruntime and with tensorrt on the config's scenes, then export_onnx.py
   for each twice: at the size the model was trained and validated at (argmax agreement
   with PyTorch's fake-quant model and the metric, on 64 val scenes: the accuracy figures)
   and at the deployed ``--size`` (the speed figures).
   With --qat, a QAT checkpoint (export.target=onnxruntime) is exported the same way.
2. onnxruntime's peer: quant_pre_process on the deployed-size float.onnx, then quantize_static
   (QDQ, per-channel int8 weights, uint8 activations, MinMax over calibration scenes); and the
   same at the validated size from the scenes calibrate.py read, scored on the same val
   scenes as ours (its metric: is ours as accurate as onnxruntime's own quantization?).
3. Latency of every deployed-size graph, interleaved in blocks, paired medians, ``--threads``
   threads; then onnxruntime's profiler splits the float, our INT8 and the peer's time by op.

Goals: INT8 (onnxruntime placement) at least 2.5x float and at least the peer (issue 9), its
metric at most ``export.max_metric_drop`` (0.3) below PyTorch fake-quant's, the export's own
gate (issue 33; argmax agreement is reported, not a goal). Figures:
bench/results/export_speed.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from bench import save_result
from pidnet import runtime
from pidnet.batches import Pairs
from pidnet.calibrate import main as calibrate_main
from pidnet.config import Config, load_config
from pidnet.engine import pick_metric
from pidnet.export_onnx import main as export_main
from pidnet.hooks import load_hooks
from pidnet.pipeline import FixedBatches, Session, build_criterion, evaluate_model
from pidnet.reports import versions

ROOT = Path(__file__).resolve().parents[1]


class Scenes(CalibrationDataReader):
    """The calib split's images, one at a time, for onnxruntime's calibrator: the first
    ``count``, or (None) those of the ``calib.num_batches`` batches calibrate.py reads. Any
    hooks' batches (pairs or dicts, ``batch.inputs``)."""

    def __init__(self, config: str, overrides: list[str], count: int | None) -> None:
        cfg = load_config(config, overrides)
        loader = Pairs(load_hooks(cfg.hooks).get_data_loader(cfg, "calib"), cfg.batch.inputs,
                       cfg.batch.targets)
        batches = itertools.islice(loader, cfg.calib.num_batches if count is None else None)
        images = [x[i:i + 1].numpy() for x, _ in batches for i in range(len(x))]
        self.images = iter(images[:count])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.images, None)
        return None if image is None else {"input": image}


def quantize_like_onnxruntime(float_graph: Path, path: Path, scenes: Scenes) -> Path:
    """onnxruntime's own static quantization of ``float_graph``: quant_pre_process, then
    quantize_static (QDQ, per-channel int8 weights, uint8 activations, MinMax)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_graph), str(prepared))
        quantize_static(str(prepared), str(path), scenes, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return path


def peer_metric(cfg: Config, graph: Path, out: Path, threads: int) -> float:
    """The config's metric of ``graph`` on the val scenes export_onnx.py checks ours on."""
    session = Session(cfg, out, load_hooks(cfg.hooks), torch.device("cpu"))
    batches = FixedBatches.val(session, cfg.export.eval_batches)
    model = runtime.OrtModel(runtime.session(graph, threads), 1)
    scores = evaluate_model(session, model, batches, build_criterion(session))
    return scores[pick_metric(scores, cfg.metric)[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--weights", required=True, help="float weights (runs/float/best.pt)")
    parser.add_argument("--qat", default=None, help="a QAT checkpoint placed for onnxruntime")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--calib-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--out-dir", default="runs/bench_export")
    parser.add_argument("--json", default=str(ROOT / "bench/results/export_speed.json"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    h, w = args.size
    timing = [f"export.threads={args.threads}", f"export.latency_runs={args.runs}"]
    checkpoints = {}
    for target in ("onnxruntime", "tensorrt"):
        cal = out / f"calibrate_{target}"
        assert calibrate_main(["--config", args.config, "--force", "--set",
                               f"model_path={args.weights}",
                               "--set", f"export.target={target}",
                               "--set", f"output_dir={cal}"]) == 0
        checkpoints[f"ptq_{target}"] = (cal / "quantized.pt", target)
    if args.qat:
        checkpoints["qat_onnxruntime"] = (Path(args.qat), "onnxruntime")
    exports, deployed = {}, {}
    for name, (ckpt, target) in checkpoints.items():
        for kind, extra in (("accuracy", ["export.eval_batches=8"]),
                            ("deployed", [f"export.input_size=[{h}, {w}]",
                                          "export.eval_batches=1"])):
            folder = out / f"{name}_{kind}"
            sets = [a for x in [*timing, *extra] for a in ("--set", x)]
            code = export_main(["--config", args.config, "--force", *sets,
                                "--set", f"model_path={ckpt}", "--set", f"export.target={target}",
                                "--set", f"output_dir={folder}"])
            assert code in (0, 3), code
            (exports if kind == "accuracy" else deployed)[name] = json.loads(
                (folder / "results.json").read_text())
    scenes = [f"user.image_size=[{h}, {w}]", f"user.crop_size=[{h}, {w}]",
              f"user.calib_images={args.calib_images}", "user.eval_batch_size=1",
              "user.batch_size=1"]

    float_graph = out / "ptq_onnxruntime_deployed" / "float.onnx"
    peer = quantize_like_onnxruntime(float_graph, out / "onnxruntime_quantize_static.onnx",
                                     Scenes(args.config, scenes, args.calib_images))
    # the peer's accuracy: quantized at the validated size from as many calib scenes as ours
    cfg = load_config(args.config, [])
    peer_accuracy = peer_metric(cfg, quantize_like_onnxruntime(
        out / "ptq_onnxruntime_accuracy" / "float.onnx",
        out / "onnxruntime_quantize_static_accuracy.onnx",
        Scenes(args.config, [], None)),
        out, args.threads)
    graphs = {"float": float_graph, **{k: out / f"{k}_deployed" / "int8.onnx" for k in deployed},
              "onnxruntime_quantize_static": peer}
    latency = runtime.paired_latency(graphs, (1, 3, h, w), args.threads, args.runs)
    speed = latency["speedup_over_float"]
    # where each graph's time goes (onnxruntime's profiler), outside the timed runs
    op_ms = {k: runtime.op_times(graphs[k], (1, 3, h, w), args.threads)
             for k in ("float", "ptq_onnxruntime", "onnxruntime_quantize_static")}
    ours = speed["ptq_onnxruntime"]
    result = {
        "command": f"python -m bench.export_speed --weights {args.weights} --out-dir {args.out_dir}"
                   + (f" --qat {args.qat}" if args.qat else ""),
        "versions": versions(), "cpu_count": os.cpu_count(), "input": [1, 3, h, w],
        "latency": latency, "op_ms_per_run": op_ms,
        "metric_drop": {k: v["metric_drop"] for k, v in exports.items()},
        "first_divergence": {k: v["layer_check"]["first_divergence"]
                             for k, v in exports.items()},
        "worst_tensors": {k: v["layer_check"]["worst"] for k, v in exports.items()},
        "file_bytes": {k: v["file_bytes"] for k, v in exports.items()},
        "agreement": {k: v["agreement"] for k, v in exports.items()},
        "agreement_at_deployed_size": {k: v["agreement"] for k, v in deployed.items()},
        "agreement_folded_pytorch": {k: v["agreement_folded_pytorch"]
                                     for k, v in exports.items()},
        "agreement_unfused_onnxruntime": {k: v["agreement_unfused_onnxruntime"]
                                          for k, v in exports.items()},
        "accuracy_input": exports["ptq_onnxruntime"]["input_shape"],
        "pixels_compared": exports["ptq_onnxruntime"]["pixels_compared"],
        "metrics": {k: v["metrics"] for k, v in exports.items()},
        "metric_onnxruntime_quantize_static": peer_accuracy,
        "integer_convs": {k: f"{v['optimized_int8_graph']['integer_convs']} of "
                             f"{v['optimized_int8_graph']['all_convs']}"
                          for k, v in exports.items()},
        "float_ops_left": {k: v["optimized_int8_graph"]["float"] for k, v in exports.items()},
        "peer_ops": runtime.optimized_ops(peer, args.threads),
        "goals": {"int8_over_float_at_least_2.5": ours >= 2.5,
                  "at_least_the_peer": ours >= speed["onnxruntime_quantize_static"],
                  "metric_drop_at_most_0.3": all(v["metric_drop"] <= 0.3
                                                 for v in exports.values())}}
    save_result(result, args.json)


if __name__ == "__main__":
    main()
