"""``calibrate.py``: post-training quantization, each calibration method side by side.

Statistics are collected once over ``calib.num_batches`` batches of the calib split; every
method in ``calib.methods`` (``percentile`` at each of ``calib.percentiles``) computes its
ranges from them and is evaluated on the val split. Then the best method with each
post-training step of ``calib.steps`` (equalization, bias correction, AdaRound), and with all
of them, one row each, as is the config's own combination of steps when it sets one. The best
row's quantized model is saved as ``quantized.pt``, and the config keys that make it QAT
``calib`` mode's start are printed.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

from .cli import base_parser, run_cli
from .engine import pick_metric
from .errors import QualityGateError
from .pipeline import (Steps, build_criterion, build_model, calibrations, evaluate_model,
                       post_training, quantized_copy_with_stats, require_trained_model,
                       save_quantized, start_session)
from .reports import format_table, write_json

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Post-training quantization: compare calibration methods.",
                         prog="calibrate.py")
    parser.add_argument("--fail-below", type=float, default=None, metavar="X",
                        help="exit with status 3 when the best method's metric is below X")
    return parser


def _calibrate(args: argparse.Namespace) -> None:
    session = start_session(
        args, default_output="runs/calibrate", force=args.force, resumable=False,
        validate=lambda cfg, hooks: require_trained_model(hooks, cfg, "calibrate.py"))
    cfg, out = session.cfg, session.out
    float_model = build_model(session)
    criterion = build_criterion(session)
    val_loader = session.hooks.get_data_loader(cfg, "val")
    calib_loader = session.hooks.get_data_loader(cfg, "calib")

    float_metrics = evaluate_model(session, float_model, val_loader, criterion)
    name, higher = pick_metric(float_metrics, cfg.metric)
    logger.info("float %s %.2f", name, float_metrics[name])
    model, stats, stats_seconds = quantized_copy_with_stats(session, float_model, calib_loader,
                                                            equalize=False)
    configured = Steps.configured(cfg.calib)
    pick = max if higher else min

    rows: list[dict[str, Any]] = []
    uncalibrated: dict[str, list[str]] = {}

    def row(label: str, quantized: Any, seconds: float, config: dict[str, Any],
            **extra: Any) -> dict[str, Any]:
        metrics = evaluate_model(session, quantized, val_loader, criterion)
        logger.info("%s: %s %.2f (float %.2f)", label, name, metrics[name], float_metrics[name])
        rows.append({"method": label, name: metrics[name],
                     "drop": float_metrics[name] - metrics[name],
                     "calib_seconds": round(seconds, 2), "metrics": metrics,
                     "config": config, **extra})
        return rows[-1]

    by_name = {}
    for calibration in calibrations(cfg.calib):
        start = time.perf_counter()
        uncalibrated[calibration.name] = calibration.apply(model, stats)
        keys = calibration.config() | (Steps().config() if configured != Steps() else {})
        row(calibration.name, model, stats_seconds + time.perf_counter() - start, keys)
        by_name[calibration.name] = calibration
    best_range = pick(rows, key=lambda r: r[name])
    calibration = by_name[best_range["method"]]

    # the post-training steps on the best range method: each alone, all together, the config's
    compared = [Steps.named([s]) for s in cfg.calib.steps]
    if len(compared) > 1:
        compared.append(Steps.named(cfg.calib.steps))
    if configured != Steps() and configured not in compared:
        compared.append(configured)
    models: dict[str, Any] = {}
    for steps in compared:
        start = time.perf_counter()
        stepped, _, report = post_training(session, float_model, calib_loader, calibration, steps)
        label = f"{calibration.name} + {steps.name}"
        row(label, stepped, time.perf_counter() - start, calibration.config() | steps.config(),
            steps=report)
        models[label] = stepped

    best = pick(rows, key=lambda r: r[name])
    if best["method"] in models:
        model = models[best["method"]]
    else:
        by_name[best["method"]].apply(model, stats)
    checkpoint = save_quantized(out / "quantized.pt", model, cfg, method=best["method"],
                                metric=name, value=best[name])
    table = [{"method": "float", name: float_metrics[name], "drop": 0.0}] + rows
    print(format_table(table, ["method", name, "drop", "calib_seconds"]))
    logger.info("best: %s; QAT calib mode starts from it with %s", best["method"],
                " ".join(f"--set {k}={v}" for k, v in best["config"].items()))
    results = {"script": "calibrate", "metric": name, "float": float_metrics,
               "methods": rows, "best_method": best["method"], "best": best[name],
               "best_config": best["config"],
               "uncalibrated_quantizers": uncalibrated, "statistics_seconds": stats_seconds,
               "calib_batches": cfg.calib.num_batches, "checkpoint": str(checkpoint)}
    print(write_json(out / "results.json", results))
    if args.fail_below is not None and best[name] < args.fail_below:
        raise QualityGateError(f"best {name} {best[name]:.2f} ({best['method']}) is below "
                               f"--fail-below {args.fail_below}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_calibrate, build_parser(), argv)
