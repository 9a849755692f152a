"""Every benchmark in one command, and one file holding their figures and goals.

    python -m bench [--weights runs/float/best.pt] [--plateau-links 8] [--only NAME ...]
                    [--collect-only]

Runs each benchmark module (each also runs alone: ``python -m bench.NAME --help``), then gathers
their JSON files into bench/results.json with the machine, the versions, the command behind
each figure and its goal. Without --weights the float PIDNet-S of ``make demo`` is used, or
trained first (runs/float/best.pt). The benchmarks measure quantization against a float model
at its plateau, which ``make demo``'s is not at the W4A4 fine-tune: first ``bench.float_plateau
--links`` trains it on (``--plateau-links`` rounds at most, seeds 0 and 1, in
runs/bench_chain), and every benchmark then starts from the chain's plateau model;
``--plateau-links 0`` takes --weights as they are. --collect-only only rebuilds
bench/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _figure(value: Any, goal: str | None, met: bool | None, command: str, source: str) -> dict:
    return {"value": value, "goal": goal, "met": met, "command": command, "source": source}


def collect() -> dict[str, Any]:
    """Each benchmark's headline figures, with the goal its issue set."""
    figures: dict[str, Any] = {}
    calib = _load("calib_speed")
    if calib:
        s = calib["summary"]
        cmd = f"python -m bench.calib_speed --weights {s['weights']}"
        figures["entropy_amax_speedup_over_modelopt"] = _figure(
            round(s["speedup_total"], 1), None, None, cmd, "calib_speed.json")
    qat = _load("qat_modes")
    if qat:
        s = qat["summary"]
        settings = sorted({r["setting"] for r in qat["rows"] if r["setting"] != "-"})
        cmd = f"python -m bench.qat_modes --float-weights {s['weights']}" + (
            f" --settings {' '.join(settings)}" if len(settings) < 3 else "")
        for row in qat["rows"]:
            name = f"{row['setting']}_{row['run']}".replace(" *", "").replace(" ", "_")
            value = (round(row["mean"], 2) if row["n"] == 1
                     else f"{row['mean']:.2f} ± {row['std']:.2f}")
            figures[f"{s['report_split']}_miou_{name.lstrip('-_')}"] = _figure(
                value, None, None, cmd, "qat_modes.json")
        for setting, goal in s["goals"].items():
            what = ("every mode >= float - 0.3 and >= control - 0.3" if setting == "w8a8" else
                    "every mode >= float - 0.2 x (float - best PTQ); best within 2.0 of float")
            figures[f"qat_goals_{setting}"] = _figure(goal["met"], what, goal["met"], cmd,
                                                      "qat_modes.json")
        figures["qat_step_over_float_step"] = _figure(
            round(s["qat_step_over_float_step"], 2), "<= 1.3",
            s["qat_step_over_float_step"] <= 1.3, cmd, "qat_modes.json")
    sens = _load("sensitivity_cost")
    if sens:
        sweep, ranks = sens["sweep"], sens["ranks"]
        figures["sensitivity_layers"] = _figure(sweep["layers"], None, None, sens["command"],
                                                "sensitivity_cost.json")
        figures["sweep_over_single_evaluations"] = _figure(
            round(sweep["sweep_over_single_evals"], 3), "<= 1.1",
            sweep["sweep_over_single_evals"] <= 1.1, sens["command"], "sensitivity_cost.json")
        figures["two_ranks_over_one_rank"] = _figure(
            round(ranks["two_over_one"], 3), "<= 0.6", ranks["two_over_one"] <= 0.6,
            sens["command"], "sensitivity_cost.json")
        figures["layers_kept_float"] = _figure(ranks["float_layers"], None, None,
                                               sens["command"], "sensitivity_cost.json")
    export = _load("export_speed")
    if export:
        speed = export["latency"]["speedup_over_float"]
        cmd = export["command"]
        figures["int8_over_float_onnxruntime"] = _figure(
            round(speed["ptq_onnxruntime"], 2), ">= 2.5", speed["ptq_onnxruntime"] >= 2.5,
            cmd, "export_speed.json")
        figures["onnxruntime_quantize_static_over_float"] = _figure(
            round(speed["onnxruntime_quantize_static"], 2), None, None, cmd,
            "export_speed.json")
        figures["int8_at_least_the_peer"] = _figure(
            speed["ptq_onnxruntime"] >= speed["onnxruntime_quantize_static"], "true",
            speed["ptq_onnxruntime"] >= speed["onnxruntime_quantize_static"], cmd,
            "export_speed.json")
        figures["tensorrt_graph_over_float_in_onnxruntime"] = _figure(
            round(speed["ptq_tensorrt"], 2), None, None, cmd, "export_speed.json")
        for name, drop in export.get("metric_drop", {}).items():
            figures[f"{name}_int8_metric_below_pytorch"] = _figure(
                round(drop, 2), "<= 0.3", drop <= 0.3, cmd, "export_speed.json")
        agreement = export["agreement"]["ptq_onnxruntime"]
        figures["int8_argmax_agreement"] = _figure(round(agreement, 4), None, None, cmd,
                                                   "export_speed.json")
        floor = export["agreement_folded_pytorch"]["ptq_onnxruntime"]
        figures["argmax_agreement_batch_norm_folded_pytorch"] = _figure(
            round(floor, 4), None, None, cmd, "export_speed.json")
        unfused = export.get("agreement_unfused_onnxruntime", {}).get("ptq_onnxruntime")
        if unfused is not None:
            figures["argmax_agreement_graph_without_integer_kernels"] = _figure(
                round(unfused, 4), None, None, cmd, "export_speed.json")
        figures["integer_convolutions"] = _figure(export["integer_convs"]["ptq_onnxruntime"],
                                                  None, None, cmd, "export_speed.json")
        ours = export["metrics"]["ptq_onnxruntime"]
        for name, value in (("float", ours["onnxruntime_float"]),
                            ("int8", ours["onnxruntime_int8"]),
                            ("quantize_static", export.get("metric_onnxruntime_quantize_static"))):
            if value is not None:
                figures[f"val_miou_onnxruntime_{name}"] = _figure(round(value, 2), None, None,
                                                                  cmd, "export_speed.json")
        if "qat_onnxruntime" in speed:
            figures["qat_int8_over_float_onnxruntime"] = _figure(
                round(speed["qat_onnxruntime"], 2), None, None, cmd, "export_speed.json")
            qat = export["agreement"]["qat_onnxruntime"]
            figures["qat_int8_argmax_agreement"] = _figure(round(qat, 4), None, None, cmd,
                                                           "export_speed.json")
    plateau = _load("float_plateau")
    if plateau:
        for setting, control in plateau["controls"].items():
            figures[f"float_fine_tune_gain_{setting}_recipe"] = _figure(
                f"{control['gain_over_float']:+.2f} ({control['mean']:.2f} ± "
                f"{control['std']:.2f} vs {plateau['float']:.2f})", "<= +0.3",
                control["gain_over_float"] <= 0.3, plateau["command"], "float_plateau.json")
    steps = _load("ptq_steps")
    if steps:
        cmd = steps["command"]
        for name, goal in steps["goals"].items():
            if name == "adaround_minutes":
                figures["adaround_minutes_pidnet_s"] = _figure(
                    round(goal["minutes"], 1), f"<= {goal['goal']:g}", goal["met"], cmd,
                    "ptq_steps.json")
            else:
                figures[f"ptq_{name}"] = _figure(
                    f"{goal[steps['split']]:.2f} (margin {goal['margin']:+.2f})",
                    name.replace("_", " "), goal["met"], cmd, "ptq_steps.json")
    other = _load("any_model_speed")
    if other:
        speed, cmd = other["latency"]["speedup_over_float"], other["command"]
        figures["lraspp_integer_convolutions"] = _figure(
            other["integer_convs"], "all", other["goals"]["every_convolution_integer"], cmd,
            "any_model_speed.json")
        figures["lraspp_int8_over_float_onnxruntime"] = _figure(
            round(speed["pidnetqat_int8"], 2), ">= quantize_static's",
            other["goals"]["at_least_the_peer"], cmd, "any_model_speed.json")
        figures["lraspp_quantize_static_over_float"] = _figure(
            round(speed["onnxruntime_quantize_static"], 2), None, None, cmd,
            "any_model_speed.json")
    versions = next((d["versions"] for d in (sens, export) if d and "versions" in d), {})
    return {"date": datetime.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpu_count": os.cpu_count()},
            "versions": versions, "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="runs/float/best.pt")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["calib_speed", "float_plateau", "qat_modes", "ptq_steps",
                                 "sensitivity_cost", "export_speed", "any_model_speed"])
    parser.add_argument("--plateau-links", type=int, default=8,
                        help="W4A4 control rounds at most to bring --weights to their plateau "
                             "first (module docstring); 0: use --weights as they are")
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args()
    if args.plateau_links < 0:
        parser.error(f"--plateau-links takes N >= 0, got {args.plateau_links}")
    if not args.collect_only:
        if not Path(args.weights).exists():
            subprocess.run([sys.executable, "qat_train.py", "--mode", "float", "--config",
                            "config.yaml", "--set", "output_dir=runs/float", "--resume"],
                           cwd=ROOT, check=True)
        weights = args.weights
        if args.plateau_links:
            weights = plateau_model(args.weights, args.plateau_links)
        runs = {"calib_speed": ["--weights", weights],
                "float_plateau": ["--weights", weights],
                "qat_modes": ["--float-weights", weights],
                "ptq_steps": ["--weights", weights],
                "sensitivity_cost": ["--weights", weights],
                "export_speed": ["--weights", weights,
                                 "--qat", "runs/bench_qat/w8a8/stats_seed0/last.pt"],
                "any_model_speed": []}
        for name, extra in runs.items():
            if args.only is None or name in args.only:
                print(f"== bench.{name}", flush=True)
                subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT,
                               check=True)
    result = collect()
    (ROOT / "bench" / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(ROOT / "bench" / "results.json")


def plateau_model(weights: str, links: int, chain: Path | None = None) -> str:
    """The float model at the W4A4 fine-tune's plateau, trained on from ``weights`` by
    ``bench.float_plateau --links`` (finished links are kept; its figures in ``chain``,
    bench/results/float_plateau_chain.json by default); exits when no link of ``links``
    reaches it."""
    chain = chain or RESULTS / "float_plateau_chain.json"
    print("== bench.float_plateau (the chain to the plateau)", flush=True)
    subprocess.run([sys.executable, "-m", "bench.float_plateau", "--weights", weights,
                    "--out-dir", "runs/bench_chain", "--seeds", "0", "1", "--links", str(links),
                    "--json", str(chain)], cwd=ROOT, check=True)
    found = json.loads(chain.read_text()).get("w4a4_plateau")
    if found is None:
        sys.exit(f"bench: the W4A4 control still gains more than 0.3 after {links} rounds from "
                 f"{weights}; raise --plateau-links ({chain})")
    return found["model"]


def markdown(result: dict[str, Any]) -> str:
    """The figures as the README's table: value, goal and whether it was met."""
    lines = [f"Measured {result['date']} on {result['machine']['platform']} "
             f"({result['machine']['cpu_count']} CPUs), torch "
             f"{result['versions'].get('torch', '?')}, nvidia-modelopt "
             f"{result['versions'].get('nvidia-modelopt', '?')}, onnxruntime "
             f"{result['versions'].get('onnxruntime', '?')}; `python -m bench`.", "",
             "| figure | value | goal | met | from |", "| --- | --- | --- | --- | --- |"]
    for name, fig in result["figures"].items():
        value = fig["value"] if not isinstance(fig["value"], list) else (
            ", ".join(fig["value"]) or "none")
        met = "" if fig["goal"] is None else ("yes" if fig["met"] else "**no**")
        lines.append(f"| {name} | {value} | {fig['goal'] or ''} | {met} | "
                     f"`bench/results/{fig['source']}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
