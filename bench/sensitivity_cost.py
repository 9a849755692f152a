"""What a sensitivity sweep costs on the embedded PIDNet-S, in units of single evaluations, and
how much a second torchrun rank saves.

    python -m bench.sensitivity_cost --weights runs/float/best.pt [--batches 2]

1. In one process: the same quantized model and the same ``--batches`` val batches; single
   evaluations timed before and after the sweep (median), the sweep (two baselines and every
   layer, as sensitivity_analysis.py runs it) timed whole. Goal: sweep <= 1.1 x (L + 2) single
   evaluations.
2. ``sensitivity_analysis.py`` on the same checkpoint under torchrun with one rank and with
   two (one thread per rank in both, as torchrun sets it for several ranks), wall time of the
   whole command. Goal: two ranks <= 0.6 x one rank.

Figures are printed and saved in bench/results/sensitivity_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import save_result
from pidnet import quant
from pidnet.calibrate import main as calibrate_main
from pidnet.config import load_config
from pidnet.hooks import load_hooks
from pidnet.pipeline import FixedBatches, Session, build_criterion, evaluate_model, load_quantized
from pidnet.reports import versions
from pidnet.sensitivity import sweep_layers

ROOT = Path(__file__).resolve().parents[1]


def sweep_ratio(config: Path, checkpoint: Path, batches: int, repeats: int) -> dict:
    cfg = load_config(config, ["device=cpu"])
    session = Session(cfg, Path(tempfile.mkdtemp()), load_hooks(cfg.hooks), torch.device("cpu"))
    model = load_quantized(session, checkpoint)
    criterion = build_criterion(session)
    data = FixedBatches.val(session, batches)
    layers = quant.execution_order(model, next(iter(data))[0])

    def measure() -> float:
        return evaluate_model(session, model, data, criterion)["miou"]

    def single() -> float:
        start = time.perf_counter()
        measure()
        return time.perf_counter() - start

    measure()                                                     # warm-up
    singles = [single() for _ in range(repeats)]
    start = time.perf_counter()
    with quant.layers_enabled(model, layers, False):
        measure()
    quantized = measure()
    rows = list(sweep_layers(model, layers, "disable_one", measure, quantized))
    sweep = time.perf_counter() - start
    singles += [single() for _ in range(repeats)]
    one = statistics.median(singles)
    return {"layers": len(layers), "batches": batches, "single_eval_s": one,
            "single_evals_s": singles, "sweep_s": sweep,
            "sweep_over_single_evals": sweep / ((len(layers) + 2) * one),
            "goal": "<= 1.1", "most_sensitive": sorted(rows, key=lambda r: -r["delta"])[:5]}


def rank_scaling(config: Path, checkpoint: Path, batches: int, out: Path) -> dict:
    times = {}
    for ranks in (1, 2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", str(ROOT / "sensitivity_analysis.py"),
               "--config", str(config), "--force", "--set", f"model_path={checkpoint}",
               "--set", f"sensitivity.num_batches={batches}",
               "--set", f"output_dir={out / f'ranks{ranks}'}"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        times[ranks] = time.perf_counter() - start
        if done.returncode not in (0, 3):
            raise SystemExit(done.stderr[-3000:])
    kept = json.loads((out / "ranks2" / "results.json").read_text())
    return {"one_rank_s": times[1], "two_ranks_s": times[2],
            "two_over_one": times[2] / times[1], "goal": "<= 0.6",
            "threads_per_rank": 1, "float_layers": kept["float_layers"],
            "baseline": kept["baseline"], "selected_metric": kept["selected_metric"],
            "command": "torchrun --standalone --nproc_per_node=N sensitivity_analysis.py "
                       "--config config.yaml --set model_path=QUANTIZED.pt "
                       f"--set sensitivity.num_batches={batches}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--weights", required=True, help="float weights (runs/float/best.pt)")
    parser.add_argument("--batches", type=int, default=2, help="val batches per evaluation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default="runs/bench_sensitivity")
    parser.add_argument("--json", default=str(ROOT / "bench/results/sensitivity_cost.json"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    assert calibrate_main(["--config", args.config, "--force", "--set",
                           f"model_path={args.weights}",
                           "--set", f"output_dir={out / 'ptq'}"]) == 0
    checkpoint = out / "ptq" / "quantized.pt"
    torch.set_num_threads(2)
    result = {"versions": versions(), "cpu_count": os.cpu_count(),
              "command": f"python -m bench.sensitivity_cost --weights {args.weights} "
                         f"--out-dir {out}",
              "sweep": sweep_ratio(Path(args.config), checkpoint, args.batches, args.repeats),
              "ranks": rank_scaling(Path(args.config), checkpoint, args.batches, out)}
    save_result(result, args.json)


if __name__ == "__main__":
    main()
