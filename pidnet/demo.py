"""``make demo``: the whole pipeline on one config, each stage feeding the next.

float training -> PTQ with every calibration method -> QAT in each of the three modes, from
the calibration PTQ chose -> sensitivity analysis of the float model at W4A4 -> ONNX export
of the best quantized model -> ``report.md``.

Each stage writes into ``<runs>/<stage>``. Rerunning after an interruption skips the stages
that finished (their ``results.json`` exists), resumes the training stages from ``last.pt``
and the sensitivity sweep from its rows, and redoes only what is missing.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .calibrate import main as calibrate_main
from .cli import EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, setup_logging, stop_on_sigterm
from .config import load_config
from .export_onnx import main as export_main
from .layer_check import describe
from .pipeline import qat_start
from .plots import plot_float_curve, plot_qat_curves
from .reports import atomic_write_text, format_table, write_json
from .sensitivity_analysis import main as sensitivity_main
from .train import main as train_main

logger = logging.getLogger(__name__)

QAT_MODES = ("calib", "stats", "direct")
# The sweep runs where quantization costs something: at 8 bits the demo's PIDNet-S loses
# nothing measurable, and at 4-bit weights (W4A8 PTQ) 0.3 on the sweep's 16 scenes, so every
# layer would look harmless; at 4-bit weights and activations (W4A4 PTQ) it loses 21 points
# there and the sweep says which layers matter most. Selection stops at 20 layers: meeting the
# tolerance takes nearly every layer (about 200 of 215), and the demo its 20 minutes.
SWEEP_SETTING = ("quant.weight_bits=4", "quant.act_bits=4", "sensitivity.max_float_layers=20")


def _results(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(name: str, folder: Path, script: Callable[[list[str]], int], args: list[str],
              resumable: bool = False, accept: Sequence[int] = (EXIT_OK,)) -> float:
    """Run one stage unless it finished; returns its seconds (0 when skipped). A training
    stage resumes from its ``last.pt``; the sweep resumes from its rows by itself; the other
    stages keep nothing worth resuming and start again."""
    if _results(folder) is not None:
        logger.info("stage %s: finished earlier (%s), skipped", name, folder / "results.json")
        return 0.0
    extra = ["--resume"] if resumable else []
    start = time.perf_counter()
    logger.info("stage %s: %s", name, " ".join(args + extra))
    code = script(args + extra)
    if code in EXIT_INTERRUPTED:   # the stage said what it saved; make demo continues from it
        logger.info("make demo stopped in stage %s; run it again to continue", name)
        raise SystemExit(code)
    if code not in accept:
        raise SystemExit(f"stage {name} failed with exit code {code}; fix the error above and "
                         "rerun: finished stages are kept")
    return time.perf_counter() - start


def chosen_calibration(ptq: dict[str, Any]) -> list[str]:
    """The config items that start QAT from the calibration PTQ chose on val: ``calib`` mode
    calibrates with it, ``stats`` starts from its ranges (``qat.stats_range``)."""
    chosen = ptq.get("best_config")   # none in a calibrate run of an older version
    return [f"{key}={value}" for key, value in qat_start(chosen).items()] if chosen else []


def best_quantized(runs: Path) -> tuple[str, Path]:
    """The quantized checkpoint with the best val metric: a QAT mode or PTQ (the stages that
    wrote them have finished)."""
    ptq = _results(runs / "calibrate")
    candidates = [(ptq["best"], "ptq " + ptq["best_method"], Path(ptq["checkpoint"]))]
    candidates += [(_results(runs / f"qat_{mode}")["best"], f"qat {mode}",
                    runs / f"qat_{mode}" / "best.pt") for mode in QAT_MODES]
    higher = ptq["metric"] != "loss"
    _value, name, path = (max if higher else min)(candidates, key=lambda c: c[0])
    return name, path


def summary(runs: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The report's rows, read only from the stages' results files (every stage writes one: a
    missed quality gate too) and the sweep's resolved config.yaml (its bit widths)."""
    ptq, sens, export = (_results(runs / s) for s in ("calibrate", "sensitivity", "export"))
    metric = ptq["metric"]
    rows = [{"stage": "float", metric: ptq["float"][metric],
             "source": "calibrate/results.json"}]
    rows += [{"stage": f"PTQ {r['method']}", metric: r[metric],
              "source": "calibrate/results.json"} for r in ptq["methods"]]
    for mode in QAT_MODES:
        res = _results(runs / f"qat_{mode}")
        rows.append({"stage": f"QAT {mode} (final epoch; best)", metric: res["final"][metric],
                     "best": res["best"], "source": f"qat_{mode}/results.json"})
    ops = export["optimized_int8_graph"]
    swept = load_config(runs / "sensitivity" / "config.yaml")
    facts = {"metric": metric, "float_layers": sens["float_layers"],
             "sensitivity_met": sens["met"], "sweep_tolerance": sens["tolerance"],
             "sweep_setting": f"W{swept.quant.weight_bits}A{swept.quant.act_bits}",
             "sweep_float": sens["baseline"]["float"],
             "sweep_quantized": sens["baseline"]["quantized"],
             "sweep_selected": sens["selected_metric"],
             "sweep_batches": swept.sensitivity.num_batches,
             "exported": export["graphs"]["int8"],
             "speedup": export["latency"]["speedup_over_float"]["int8"],
             "metric_drop": export["metric_drop"],
             "max_metric_drop": export["max_metric_drop"],
             "first_divergence": export["layer_check"]["first_divergence"],
             "worst_tensors": export["layer_check"]["worst"],
             "agreement": export["agreement"],
             "agreement_folded": export["agreement_folded_pytorch"],
             "agreement_unfused": export["agreement_unfused_onnxruntime"],
             "int8_metric": export["metrics"]["onnxruntime_int8"],
             "integer_convs": f"{ops['integer_convs']} of {ops['all_convs']}"}
    return rows, facts


def write_report(runs: Path, exported_from: str, seconds: dict[str, float]) -> Path:
    rows, facts = summary(runs)
    metric = facts["metric"]
    curves = {mode: [e[metric] for e in _results(runs / f"qat_{mode}")["epochs"]]
              for mode in QAT_MODES}
    ptq = {r["stage"]: r[metric] for r in rows if r["stage"].startswith("PTQ")}
    plot_qat_curves(curves, rows[0][metric], ptq, metric, runs / "qat_curves.png")
    float_epochs = _results(runs / "float")["epochs"]
    float_curve = [e[metric] for e in float_epochs]
    plot_float_curve([e["train_loss"] for e in float_epochs], float_curve, metric,
                     runs / "float_curve.png")
    gate = "met" if facts["metric_drop"] <= facts["max_metric_drop"] else "missed"
    diverged = describe(facts["first_divergence"]) if facts["first_divergence"] else "none"
    table = format_table(rows, ["stage", metric, "best", "source"])
    lines = [
        "# PIDNetQAT demo report", "",
        f"Every figure below is read from the `results.json` named beside it (under `{runs}`).",
        "", "```", table, "```", "",
        f"- Exported model: {exported_from} -> `{facts['exported']}`",
        f"- Sensitivity of the float model at {facts['sweep_setting']} (PTQ {metric} "
        f"{facts['sweep_quantized']:.2f} against float {facts['sweep_float']:.2f} on "
        f"{facts['sweep_batches']} val batches): the {len(facts['float_layers'])} layers "
        f"selection keeps in float bring it to {facts['sweep_selected']:.2f} (tolerance "
        f"{facts['sweep_tolerance']}: {'met' if facts['sensitivity_met'] else 'not met'}); "
        f"the first: {', '.join(facts['float_layers'][:8]) or 'none'} "
        "(sensitivity/results.json, sensitivity/sensitivity.png)",
        f"- INT8 in onnxruntime (CPU): {metric} {facts['int8_metric']:.2f}, "
        f"{facts['metric_drop']:.2f} below PyTorch fake-quant (gate: at most "
        f"{facts['max_metric_drop']}: {gate}); layer by layer, first divergence: {diverged} "
        "(export/layers.csv, export/layers.png)",
        f"- INT8 in onnxruntime (CPU): {facts['speedup']:.2f}x the float graph's speed, "
        f"argmax agreement with PyTorch {facts['agreement']:.2%} (the same graph without "
        f"integer kernels: {facts['agreement_unfused']:.2%}; PyTorch alone with batch norm "
        f"folded: {facts['agreement_folded']:.2%}), integer convolutions "
        f"{facts['integer_convs']} (export/results.json)",
        f"- Float model, val {metric} per epoch (float/results.json): "
        + ", ".join(f"{v:.2f}" for v in float_curve),
        "", "![Float per epoch](float_curve.png)", "",
        "![QAT per epoch](qat_curves.png)", "",
        "![Sensitivity per layer](sensitivity/sensitivity.png)", "",
        "Stage wall times this run (0: finished in an earlier run): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), ""]
    print(table)
    path = atomic_write_text(runs / "report.md", "\n".join(lines))
    write_json(runs / "summary.json", {"rows": rows, **facts, "exported_from": exported_from,
                                       "seconds": seconds})
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--runs", default="runs", help="folder holding every stage's output")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every stage (repeatable)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        with stop_on_sigterm():
            return _demo(args)
    except KeyboardInterrupt as exc:   # between stages: each stage reports its own stop
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}; finished stages are kept: run make "
              "demo again to continue", file=sys.stderr)
        return 128 + signum


def _demo(args: argparse.Namespace) -> int:
    runs = Path(args.runs)
    sets = [a for s in args.set for a in ("--set", s)]

    def common(stage: str, *more: str) -> list[str]:
        return ["--config", args.config, *sets, "--set", f"output_dir={runs / stage}",
                *(a for m in more for a in ("--set", m))]

    float_weights = runs / "float" / "best.pt"
    seconds = {"float": run_stage("float", runs / "float", train_main,
                                  ["--mode", "float", *common("float")], resumable=True)}
    seconds["calibrate"] = run_stage("calibrate", runs / "calibrate", calibrate_main,
                                     common("calibrate", f"model_path={float_weights}"))
    calibration = chosen_calibration(_results(runs / "calibrate"))
    for mode in QAT_MODES:
        seconds[f"qat_{mode}"] = run_stage(
            f"qat {mode}", runs / f"qat_{mode}", train_main,
            ["--mode", mode, *common(f"qat_{mode}", f"model_path={float_weights}",
                                     *calibration)],
            resumable=True)
    best_name, best_path = best_quantized(runs)
    logger.info("best quantized model: %s (%s)", best_name, best_path)
    seconds["sensitivity"] = run_stage(
        "sensitivity", runs / "sensitivity", sensitivity_main,
        common("sensitivity", f"model_path={float_weights}", *calibration, *SWEEP_SETTING),
        accept=(EXIT_OK, EXIT_GATE))
    seconds["export"] = run_stage("export", runs / "export", export_main,
                                  common("export", f"model_path={best_path}"),
                                  accept=(EXIT_OK, EXIT_GATE))
    print(write_report(runs, best_name, seconds))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
