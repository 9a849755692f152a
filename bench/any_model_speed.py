"""A model the toolkit never saw, deployed INT8 in onnxruntime: torchvision's LRASPP
(MobileNetV3-Large, random weights: the speed does not depend on them) from
``examples/segmentation``, against its float graph and onnxruntime's own static quantization
of the same float graph, in one run.

    python -m bench.any_model_speed [--size 256 512] [--threads 2]

1. calibrate.py (max) with export.target=onnxruntime at ``--size``: the model is rewritten
   with torch.fx (functional adds, products and resizes made modules) before quantizers go in;
2. export_onnx.py at the same size: its optimized INT8 graph names every op left in float;
3. onnxruntime's peer: quant_pre_process + quantize_static (QDQ, per-channel int8 weights,
   uint8 activations, MinMax) of the same float.onnx over the same calib images;
4. latency of the three graphs, interleaved in blocks, paired medians.

Goals (issue 32): every convolution of our INT8 graph integer, and it at least as fast as the
peer. Figures: bench/results/any_model_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


from bench import save_result
from bench.export_speed import Scenes, quantize_like_onnxruntime
from pidnet import runtime
from pidnet.calibrate import main as calibrate_main
from pidnet.export_onnx import main as export_main
from pidnet.reports import versions

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "segmentation" / "config.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per graph: a run "
                        "takes about 10 ms, where machine noise moves single blocks by 30%%")
    parser.add_argument("--out-dir", default="runs/bench_any_model")
    parser.add_argument("--json", default=str(ROOT / "bench/results/any_model_speed.json"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    h, w = args.size
    overrides = [f"user.size=[{h}, {w}]", "user.batch_size=1", "calib.num_batches=8",
                 "export.target=onnxruntime"]
    sets = [a for x in overrides for a in ("--set", x)]
    cal = out / "calibrate"
    assert calibrate_main(["--config", str(CONFIG), "--force", *sets, "--set",
                           "calib.methods=[max]", "--set", f"output_dir={cal}"]) == 0
    export = out / "export"
    code = export_main(["--config", str(CONFIG), "--force", *sets,
                        "--set", f"export.threads={args.threads}",
                        "--set", "export.eval_batches=2", "--set", "export.latency_runs=3",
                        "--set", f"model_path={cal / 'quantized.pt'}",
                        "--set", f"output_dir={export}"])
    assert code in (0, 3), code
    ours = json.loads((export / "results.json").read_text())
    peer = quantize_like_onnxruntime(export / "float.onnx", out / "quantize_static.onnx",
                                     Scenes(str(CONFIG), overrides, None))
    graphs = {"float": export / "float.onnx", "pidnetqat_int8": export / "int8.onnx",
              "onnxruntime_quantize_static": peer}
    latency = runtime.paired_latency(graphs, (1, 3, h, w), args.threads, args.runs)
    speed = latency["speedup_over_float"]
    graph = ours["optimized_int8_graph"]
    peer_graph = runtime.optimized_ops(peer, args.threads)
    result = {
        "command": "python -m bench.any_model_speed "
                   f"--size {h} {w} --threads {args.threads} --runs {args.runs}",
        "model": "torchvision lraspp_mobilenet_v3_large(weights=None, num_classes=4)",
        "versions": versions(), "cpu_count": os.cpu_count(), "input": [1, 3, h, w],
        "latency": latency,
        "integer_convs": f"{graph['integer_convs']} of {graph['all_convs']}",
        "ours": {k: graph[k] for k in ("integer", "float", "float_nodes")},
        "peer": {k: peer_graph[k] for k in ("integer", "float")},
        "peer_integer_convs": f"{peer_graph['integer_convs']} of {peer_graph['all_convs']}",
        "metric_drop": ours["metric_drop"],
        "goals": {"every_convolution_integer": graph["integer_convs"] == graph["all_convs"],
                  "at_least_the_peer": speed["pidnetqat_int8"]
                  >= speed["onnxruntime_quantize_static"]}}
    save_result(result, args.json)


if __name__ == "__main__":
    main()
