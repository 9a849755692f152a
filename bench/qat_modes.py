"""Float vs PTQ (each calibration method) vs QAT (each mode) on the embedded default, and the
cost of one QAT training step relative to a float step.

    python -m bench.qat_modes [--float-weights runs/float/best.pt] [--out-dir runs/bench_qat]

Without --float-weights, the float baseline is trained first (qat_train.py --mode float).
Every stage runs through the project's own scripts with config.yaml; the figures are printed
as a table and saved in bench/results/qat_modes.json. Goals (issue 5): every mode's INT8 mIoU
at least float - 0.3, QAT above the best PTQ, QAT step / float step at most 1.3.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from pidnet import quant
from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import load_weights
from pidnet.config import load_config
from pidnet.engine import to_device
from pidnet.hooks import load_hooks
from pidnet.pipeline import example_input
from pidnet.reports import format_table
from pidnet.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def step_time_ratio(config: Path, weights: Path, steps: int) -> dict[str, float]:
    """Median time of one training step (forward, backward, SGD) of the fake-quant model over
    the float model's, the two interleaved on the same batches."""
    cfg = load_config(config)
    hooks = load_hooks(cfg.hooks)
    float_model = hooks.get_model(cfg)
    load_weights(float_model, weights)
    loader = hooks.get_data_loader(cfg, "train")
    qat_model = quant.insert_quantizers(copy.deepcopy(float_model), cfg.quant, cfg.export.target,
                                        example_input(loader, torch.device("cpu")))
    criterion = hooks.get_criterion(cfg)
    stats = quant.collect_stats(qat_model, loader, torch.device("cpu"), 2)
    quant.apply_ranges(qat_model, stats, cfg.calib.method)
    models = {"float": float_model, "qat": qat_model}
    optims = {k: torch.optim.SGD(m.parameters(), lr=1e-5) for k, m in models.items()}
    times: dict[str, list[float]] = {"float": [], "qat": []}
    batches = iter(loader)
    for i in range(steps + 2):
        inputs, targets = next(batches)
        for name in ("float", "qat") if i % 2 else ("qat", "float"):
            model = models[name].train()
            start = time.perf_counter()
            loss = criterion(model(inputs), to_device(targets, torch.device("cpu")))
            optims[name].zero_grad()
            loss.backward()
            optims[name].step()
            if i >= 2:                                     # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    f, q = statistics.median(times["float"]), statistics.median(times["qat"])
    return {"float_step_s": f, "qat_step_s": q, "ratio": q / f, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--float-weights", default=None)
    parser.add_argument("--out-dir", default="runs/bench_qat")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--json", default=str(ROOT / "bench/results/qat_modes.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out_dir)
    common = ["--config", args.config, "--force"]

    weights = args.float_weights
    if weights is None:
        weights = str(out / "float" / "best.pt")
        assert train_main(["--mode", "float", *common, "--set",
                           f"output_dir={out / 'float'}"]) == 0
    float_res = out / "float" / "results.json"
    calibrate_main([*common, "--set", f"model_path={weights}",
                    "--set", f"output_dir={out / 'ptq'}"])
    ptq = json.loads((out / "ptq" / "results.json").read_text())
    rows = [{"stage": "float", "miou": ptq["float"]["miou"]}]
    rows += [{"stage": f"ptq {r['method']}", "miou": r["miou"],
              "seconds": r["calib_seconds"]} for r in ptq["methods"]]
    for mode in ("calib", "stats", "direct"):
        start = time.perf_counter()
        assert train_main(["--mode", mode, *common, "--set", f"model_path={weights}",
                           "--set", f"output_dir={out / mode}"]) == 0
        res = json.loads((out / mode / "results.json").read_text())
        rows.append({"stage": f"qat {mode}", "miou": res["final"]["miou"],
                     "best": res["best"], "start": res["baselines"]["start"]["miou"],
                     "seconds": round(time.perf_counter() - start, 1)})
    float_miou = rows[0]["miou"]
    best_ptq = max(r["miou"] for r in rows if r["stage"].startswith("ptq"))
    for r in rows:
        r["drop"] = float_miou - r["miou"]
    qat_rows = [r for r in rows if r["stage"].startswith("qat")]
    speed = step_time_ratio(Path(args.config), Path(weights), args.steps)
    summary = {
        "float_miou": float_miou, "best_ptq_miou": best_ptq,
        "every_mode_within_0.3": all(r["miou"] >= float_miou - 0.3 for r in qat_rows),
        "every_mode_above_best_ptq": all(r["miou"] > best_ptq for r in qat_rows),
        "qat_step_over_float_step": speed["ratio"], "step_times": speed,
        "float_results": str(float_res) if float_res.exists() else None,
        "weights": str(weights), "torch_threads": torch.get_num_threads()}
    print(format_table(rows, ["stage", "miou", "drop", "start", "best", "seconds"]))
    print(json.dumps(summary, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(args.json)


if __name__ == "__main__":
    main()
