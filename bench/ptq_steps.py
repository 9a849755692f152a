"""PTQ with no training: equalization, bias correction and AdaRound against range calibration
alone and against QAT ``calib``, on the embedded PIDNet-S.

    python -m bench.ptq_steps [--weights runs/float/best.pt] [--out-dir runs/bench_qat]
                              [--qat bench/results/qat_modes.json] [--iterations N]

The float model is the QAT benchmark's, and so are the range methods (its ``<setting>/ptq.json``
in ``--out-dir``, computed here when missing): the best on val at each bit setting gets each
post-training step alone and all of them (``pipeline.post_training``, as ``calibrate.py`` runs
them), scored on val (where a choice would be made) and on the held-out test scenes (reported).

- W4A8, per-channel weights: goal, the best row with AdaRound within 1.0 of float (test).
- W8A8 with per-tensor weights (``quant.per_channel=false``; PIDNet's batch norms must be
  folded first, which ``calib.equalize`` does): batch norms folded alone, equalization, and
  equalization plus bias correction; goal, the last within 0.3 of per-channel W8A8 PTQ.
- W4A4: all three steps, reported.
- AdaRound's time over every layer of PIDNet-S (goal: 10 minutes) and per layer.

QAT ``calib`` (mean of seeds, test) comes from the QAT benchmark's results (``--qat``) for the
same table. Each row is kept as it finishes (``<out-dir>/ptq_steps/<setting>.json``); a rerun
only computes what is missing. Output: a table and bench/results/ptq_steps.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import save_result
from bench.qat_modes import OUT_DIR, Bench
from pidnet import quant
from pidnet.cli import setup_logging
from pidnet.pipeline import (Calibration, Steps, activation_stats, example_input,
                             post_training)
from pidnet.reports import format_table, write_json

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.ptq_steps")

# setting -> (weight bits, activation bits, per-channel weights, steps compared)
ALL = Steps(True, True, True)
PLAN: dict[str, tuple[int, int, bool, list[Steps]]] = {
    "w4a8": (4, 8, True, [Steps(adaround=True), Steps(equalize=True),
                          Steps(bias_correction=True), ALL]),
    "w8a8_per_tensor": (8, 8, False, [Steps(equalize=True),
                                      Steps(equalize=True, bias_correction=True)]),
    "w4a4": (4, 4, True, [ALL]),
}
RANGES_OF = {"w4a8": "w4a8", "w8a8_per_tensor": "w8a8", "w4a4": "w4a4"}   # whose ptq.json
ADAROUND_MINUTES = 10.0
W4A8_WITHIN = 1.0
PER_TENSOR_WITHIN = 0.3


def _session(bench: Bench, setting: str):
    weight_bits, act_bits, per_channel, _ = PLAN[setting]
    cfg = bench.session.cfg
    quant_cfg = dataclasses.replace(cfg.quant, weight_bits=weight_bits, act_bits=act_bits,
                                    per_channel=per_channel)
    return dataclasses.replace(bench.session, cfg=dataclasses.replace(cfg, quant=quant_cfg))


def _fold_only(bench: Bench, session, calibration: Calibration) -> dict[str, Any]:
    """Per-tensor weights with batch norms folded and nothing equalized: what equalization
    starts from."""
    loader = bench.hooks.get_data_loader(session.cfg, "calib")
    start = time.perf_counter()
    model = bench.float_model().eval()
    quant.equalize(model, example_input(session, loader), sweeps=0)
    model = quant.insert_quantizers(model, session.cfg.quant, session.cfg.export.target,
                                    example_input(session, loader))
    calibration.apply(model, activation_stats(session, model, loader))
    return {"steps": "batch norms folded", **bench.both(model),
            "seconds": time.perf_counter() - start}


def run_setting(bench: Bench, setting: str, out: Path) -> dict[str, Any]:
    path = out / f"{setting}.json"
    done = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    ranges = bench.ptq(RANGES_OF[setting])
    method = ranges["best_on_val"]
    config = ranges["configs"][method]
    calibration = Calibration(config["calib.method"], config.get("calib.percentile", 99.99))
    session = _session(bench, setting)
    done.update(range_method=method, ranges=ranges["methods"][method])
    rows = done["rows"]
    if setting == "w8a8_per_tensor" and "fold" not in rows:
        rows["fold"] = _fold_only(bench, session, calibration)
        write_json(path, done)
    for steps in PLAN[setting][3]:
        if steps.name in rows:
            continue
        start = time.perf_counter()
        model, _, report = post_training(
            session, bench.float_model(), bench.hooks.get_data_loader(session.cfg, "calib"),
            calibration, steps)
        seconds = time.perf_counter() - start
        row = {"steps": steps.name, **bench.both(model), "seconds": seconds}
        if "adaround" in report:
            layers = report["adaround"]["layers"]
            row["adaround"] = {
                "seconds": report["adaround"]["seconds"], "layers": len(layers),
                "seconds_per_layer_median": statistics.median(v["seconds"]
                                                              for v in layers.values()),
                "better_than_nearest": sum(v["adaround"] < v["nearest"]
                                           for v in layers.values()),
                "per_layer": layers}
        rows[steps.name] = row
        logger.info("%s %s + %s: val %.2f test %.2f (%.0f s)", setting, method, steps.name,
                    row["val"], row["test"], seconds)
        write_json(path, done)
    return done


def _qat_calib(qat_path: Path, setting: str) -> dict[str, Any] | None:
    if not qat_path.exists():
        return None
    rows = json.loads(qat_path.read_text())["rows"]
    found = [r for r in rows if r["setting"] == setting and r["run"] == "qat calib"]
    return {"mean": found[0]["mean"], "std": found[0]["std"], "n": found[0]["n"]} if found \
        else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--weights", default="runs/float/best.pt")
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument("--qat", default=str(ROOT / "bench/results/qat_modes.json"))
    parser.add_argument("--settings", nargs="+", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. calib.adaround_iterations=500)")
    parser.add_argument("--json", default=str(ROOT / "bench/results/ptq_steps.json"))
    args = parser.parse_args(argv)
    setup_logging(0)
    torch.set_num_threads(2)
    out = Path(args.out_dir)
    bench = Bench(Path(args.config), Path(args.weights), out, args.set)
    float_fig = bench.float_figures()
    split = bench.report_split
    results = {s: run_setting(bench, s, out / "ptq_steps") for s in args.settings}

    table = []
    for setting, done in results.items():
        first = ("per-channel weights, ranges only" if setting == "w8a8_per_tensor"
                 else "ranges only")
        table.append({"setting": setting, "rows": f"{done['range_method']} ({first})",
                      "val": done["ranges"]["val"], split: done["ranges"][split],
                      "seconds": ""})
        for row in done["rows"].values():
            table.append({"setting": setting, "rows": f"{done['range_method']} + {row['steps']}",
                          "val": row["val"], split: row[split],
                          "seconds": round(row["seconds"], 1)})
        qat = _qat_calib(Path(args.qat), RANGES_OF[setting])
        if qat is not None and setting != "w8a8_per_tensor":
            table.append({"setting": setting, "rows": f"QAT calib (mean of {qat['n']} seeds)",
                          "val": "", split: qat["mean"], "seconds": ""})
    print(f"{bench.metric}; float val {float_fig['val']:.2f}, {split} {float_fig[split]:.2f}")
    print(format_table(table, ["setting", "rows", "val", split, "seconds"]))

    goals: dict[str, Any] = {}
    if "w4a8" in results:
        rows = [r for r in results["w4a8"]["rows"].values() if "AdaRound" in r["steps"]]
        best = max(rows, key=lambda r: r["val"])       # chosen on val, reported on test
        margin = best[split] - (float_fig[split] - W4A8_WITHIN)
        goals["w4a8_adaround_within_1_of_float"] = {
            "row": best["steps"], split: best[split], "margin": margin, "met": margin >= 0}
        ada = results["w4a8"]["rows"]["AdaRound"]["adaround"]
        goals["adaround_minutes"] = {"minutes": ada["seconds"] / 60,
                                     "goal": ADAROUND_MINUTES,
                                     "met": ada["seconds"] / 60 <= ADAROUND_MINUTES}
    if "w8a8_per_tensor" in results:
        per_channel = bench.ptq("w8a8")
        reference = per_channel["methods"][per_channel["best_on_val"]][split]
        row = results["w8a8_per_tensor"]["rows"]["equalize + bias correction"]
        margin = row[split] - (reference - PER_TENSOR_WITHIN)
        goals["w8a8_per_tensor_within_0.3_of_per_channel"] = {
            split: row[split], "per_channel": reference, "margin": margin, "met": margin >= 0}
    print(json.dumps(goals, indent=2))
    save_result({"command": f"python -m bench.ptq_steps --weights {args.weights} --out-dir {out}"
                 + "".join(f" --set {s}" for s in args.set),
                 "metric": bench.metric, "split": split, "float": float_fig,
                 "settings": results, "goals": goals,
                 "qat_calib": {s: _qat_calib(Path(args.qat), RANGES_OF[s]) for s in results},
                 "config": {k: v for k, v in dataclasses.asdict(bench.session.cfg.calib).items()
                            if k.startswith(("adaround", "step"))}}, args.json)


if __name__ == "__main__":
    main()
