"""Is the float baseline at its plateau? More float training, as much as QAT gets, should not
make it better.

    python -m bench.float_plateau --weights runs/float/best.pt [--seeds 0 1 2]

From the float checkpoint, the float fine-tune controls of ``bench.qat_modes`` (``--mode float``
with a QAT recipe's epochs, scenes, batch, learning rate and frozen batch norm, no quantizers):
the W8A8 recipe (3 epochs, batches of 8) and the W4A4 recipe (10 epochs, batches of 2 at 8e-3,
on whole scenes), each for every seed, scored on the held-out test scenes. A model at its
plateau gains at most 0.3 mIoU from either (mean over seeds): the goal of issue 29, under which
a QAT figure above float means what it says. The controls are the QAT benchmark's own (the same
runs, in its ``--out-dir``, runs/bench_qat by default): after ``bench.qat_modes`` nothing trains
again. Figures: bench/results/float_plateau.json (the controls' table:
<out-dir>/float_plateau_table.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import save_result
from bench.qat_modes import main as qat_modes_main

ROOT = Path(__file__).resolve().parents[1]
GAIN_AT_MOST = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="float weights (runs/float/best.pt)")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out-dir", default="runs/bench_qat")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench/results/float_plateau.json"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    qat_modes_main(["--config", args.config, "--float-weights", args.weights,
                    "--out-dir", str(out), "--settings", "w8a8", "w4a4", "--runs", "control",
                    "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs),
                    "--steps", "1", "--json", str(out / "float_plateau_table.json")])
    table = json.loads((out / "float_plateau_table.json").read_text())
    summary = table["summary"]
    split, float_value = summary["report_split"], summary["float"][summary["report_split"]]
    controls = {row["setting"]: row for row in table["rows"] if row["run"] == "control"}
    gains = {s: row["mean"] - float_value for s, row in controls.items()}
    result = {
        "command": f"python -m bench.float_plateau --weights {args.weights} "
                   f"--seeds {' '.join(map(str, args.seeds))}",
        "weights": args.weights, "metric": summary["metric"], "split": split,
        "float": float_value, "float_val": summary["float"]["val"],
        "controls": {s: {"mean": row["mean"], "std": row["std"], "n": row["n"],
                         "epochs": summary["epochs"][s], "batch": summary["batch"][s],
                         "lr": summary["lr"][s], "train_images": summary["train_images"][s],
                         "recipe": summary["mode_recipes"][s].get("control", {}),
                         "gain_over_float": gains[s]} for s, row in controls.items()},
        "goal": f"every control gains at most {GAIN_AT_MOST} over float (mean of seeds)",
        "met": all(g <= GAIN_AT_MOST for g in gains.values())}
    save_result(result, args.json)


if __name__ == "__main__":
    main()
