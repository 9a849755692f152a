"""``sensitivity_analysis.py``: which layers lose accuracy when quantized, and the smallest set
kept in float that meets ``sensitivity.tolerance``.

Every measurement is an evaluation (eval mode, no gradients) on the same batches: the val
split, or its first ``sensitivity.num_batches`` batches kept in memory. Each layer's row is
appended to a rows file as it finishes, so rerunning the same command after a kill skips the
finished layers. Under torchrun the layers are shared out across ranks (each rank evaluates
alone, so any hooks file works); rank 0 gathers the rows, selects and writes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import quant
from .cli import base_parser, run_cli
from .config import Config, config_to_dict
from .distributed import env_world_size, join_group, rank, shutdown
from .engine import interactive, pick_metric, progress_bar, to_device
from .errors import InputError, QualityGateError
from .pipeline import (FixedBatches, Session, build_criterion, evaluate_model, quantized_model,
                       require_trained_model, save_quantized, start_session)
from .plots import plot_sensitivity
from .reports import versions, write_csv, write_json
from .sensitivity import (Objective, exclude_override, rank_layers, select_float_layers,
                          sweep_layers)

logger = logging.getLogger(__name__)

ROWS_GLOB = "sensitivity.rows.rank*.jsonl"


def _fingerprint(cfg: Config) -> str:
    """What the per-layer rows depend on: a rerun with another value starts a new sweep."""
    data = config_to_dict(cfg)
    keys = ("hooks", "model_path", "data_path", "seed", "metric", "quant", "calib", "user")
    picked: dict[str, Any] = {k: data[k] for k in keys}
    picked["sweep"] = {k: data["sensitivity"][k] for k in ("direction", "num_batches")}
    picked["target"] = data["export"]["target"]
    if cfg.model_path is not None:
        stat = os.stat(cfg.model_path)
        picked["model_file"] = [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _read_rows(out: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Finished rows of an interrupted sweep (a torn last line is skipped). Rows of another
    config are an error: they are kept, not overwritten."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob(ROWS_GLOB)):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.pop("fingerprint", None) != fingerprint:
                raise InputError(f"{path} holds a sweep of another model or config; pass "
                                 "--force to start over, or set another output_dir")
            rows[row["layer"]] = row
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _gather_rows(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Every rank's rows on every rank; then the group is left, so rank 0 goes on alone."""
    if env_world_size() == 1:
        return rows
    join_group(device)
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    shutdown()
    return [r for part in gathered for r in part]


def _analyse(args: argparse.Namespace) -> None:
    session = start_session(
        args, default_output="runs/sensitivity", force=args.force, resumable=False,
        validate=lambda cfg, hooks: require_trained_model(hooks, cfg, "sensitivity_analysis.py"),
        join_group=False)
    cfg, out = session.cfg, session.out
    fingerprint = _fingerprint(cfg)
    my_rows = out / f"sensitivity.rows.rank{rank()}.jsonl"
    if args.force:
        my_rows.unlink(missing_ok=True)
        if rank() == 0:
            for path in out.glob(ROWS_GLOB):
                if int(path.stem.rsplit("rank", 1)[1]) >= env_world_size():
                    path.unlink()
        done: dict[str, dict[str, Any]] = {}
    else:
        done = _read_rows(out, fingerprint)

    model, source = quantized_model(session)
    criterion = build_criterion(session)
    batches = FixedBatches.val(session, cfg.sensitivity.num_batches)
    first = next(iter(batches))[0]
    layers = quant.execution_order(model, to_device(first, session.device))

    picked: dict[str, Any] = {}

    def measure() -> float:
        metrics = evaluate_model(session, model, batches, criterion)
        if not picked:
            picked["name"], picked["higher"] = pick_metric(metrics, cfg.metric)
        return metrics[picked["name"]]

    # rank 0 alone measures the baselines (and later selects): it takes the smaller share
    baseline: dict[str, float] = {}
    if rank() == 0:
        with quant.layers_enabled(model, layers, False):
            baseline["float"] = measure()
        baseline["quantized"] = measure()
        logger.info("%s: float %.4f, fully quantized %.4f; %d layers (%s), %d already measured",
                    picked["name"], baseline["float"], baseline["quantized"], len(layers),
                    source, len(done))
    # each layer has one owner, fixed by its position (not by what a rank found finished, as
    # other ranks may already be appending this run's rows); rank 0 owns the smaller share
    owned = layers[(rank() + 1) % env_world_size()::env_world_size()]
    mine = [n for n in owned if n not in done]
    new_rows = []
    for row in sweep_layers(model, mine, cfg.sensitivity.direction, measure,
                            baseline.get("quantized"),
                            progress=lambda names: progress_bar(names, "layers", leave=True)):
        _append_row(my_rows, {"fingerprint": fingerprint, **row})
        new_rows.append(row)
        args.progress.saved = (f"{len(done) + len(new_rows)} of {len(layers)} layers measured "
                               f"in {my_rows} (the same command measures the rest)")
        if not interactive():
            logger.info("layer %s: %s %.4f", row["layer"], picked["name"], row["metric"])
    gathered = {r["layer"]: r for r in _gather_rows(new_rows, session.device)}
    if rank() != 0:
        return
    name = picked["name"]
    objective = Objective(picked["higher"], cfg.sensitivity.tolerance)
    rows = [{"index": i, **{**done, **gathered}[n]} for i, n in enumerate(layers)]
    for row in rows:
        row["delta"] = row["metric"] - baseline["quantized"]
    order = rank_layers(rows, cfg.sensitivity.direction, baseline, objective)
    float_layers, steps, met = select_float_layers(model, order, baseline, objective, measure,
                                                   cfg.sensitivity.max_float_layers)
    _write_outputs(session, model, rows, order, baseline, name, objective, float_layers, steps,
                   met, source, len(batches) if cfg.sensitivity.num_batches else None)
    if not met:
        raise QualityGateError(
            f"no selection of float layers brings {name} within {cfg.sensitivity.tolerance} of "
            f"float ({baseline['float']:.4f}; best reached {steps[-1]['metric']:.4f}); "
            "results written, no model saved")


def _write_outputs(session: Session, model: nn.Module, rows: Sequence[dict[str, Any]],
                   order: Sequence[str], baseline: dict[str, float], metric: str,
                   objective: Objective, float_layers: list[str],
                   steps: list[dict[str, Any]], met: bool,
                   source: str, batches: int | None) -> None:
    cfg, out = session.cfg, session.out
    sens = cfg.sensitivity
    checkpoint = None
    if met:
        checkpoint = save_quantized(out / sens.output_file, model, cfg, float_layers=float_layers,
                                    metric=metric, value=steps[-1]["metric"])
        print(f"keep in float: {', '.join(float_layers) or '(none)'}")
        print(f"same layers in calibrate.py / qat_train.py: {exclude_override(float_layers)}")
    ranks = {n: i + 1 for i, n in enumerate(order)}
    rows = [{**r, "sensitivity_rank": ranks[r["layer"]]} for r in rows]
    report = {
        "meta": {"versions": versions(), "config": config_to_dict(cfg), "seed": cfg.seed,
                 "model_source": source, "metric": metric,
                 "higher_is_better": objective.higher_is_better,
                 "direction": sens.direction, "tolerance": sens.tolerance,
                 "batches": batches if batches is not None else "all of the val split",
                 "ranks": env_world_size()},
        "baseline": baseline, "layers": rows,
        "selection": {"met": met, "steps": steps}, "float_layers": float_layers}
    write_json(out / "sensitivity.json", report)
    write_csv(out / "sensitivity.csv", rows)
    plot_sensitivity(rows, order, baseline, metric, sens.direction, out / "sensitivity.png")
    results = {"script": "sensitivity_analysis", "metric": metric, "baseline": baseline,
               "tolerance": sens.tolerance, "met": met, "float_layers": float_layers,
               "selected_metric": steps[-1]["metric"],
               "exclude_override": exclude_override(float_layers),
               "checkpoint": str(checkpoint) if checkpoint else None,
               "files": {k: str(out / f"sensitivity.{k}") for k in ("json", "csv", "png")}}
    written = write_json(out / "results.json", results)
    for path in out.glob(ROWS_GLOB):   # the sweep is complete: its rows live in the reports
        path.unlink()
    print(written)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("Per-layer quantization sensitivity and the smallest set of layers to "
                         "keep in float.", force_help="start over in an output_dir that holds "
                         "results or a partial sweep", prog="sensitivity_analysis.py")
    return run_cli(_analyse, parser, argv)
