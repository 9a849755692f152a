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
import dataclasses
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
from .checkpoint import load_weights, read_checkpoint
from .cli import base_parser, run_cli
from .config import Config, config_to_dict
from .distributed import env_world_size, join_group, rank, shutdown
from .engine import interactive, pick_metric, progress_bar
from .errors import InputError, QualityGateError
from .pipeline import (FixedBatches, Session, build_criterion, evaluate_model, example_input,
                       quantized_model, require_trained_model, save_quantized, start_session)
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


_MEASURED = ("layer", "metric", "metrics", "seconds")   # what a row holds before selection


def _finished_sweep(out: Path, fingerprint: str) -> dict[str, Any]:
    """The finished sweep in ``out`` (``sensitivity.json``), for ``--reselect``: measured on
    the same model, batches and quantization as now asked (tolerance and the number of float
    layers may differ)."""
    path = out / "sensitivity.json"
    if not path.is_file():
        raise InputError(f"--reselect needs a finished sweep in {out} (sensitivity.json); run "
                         "the sweep without --reselect first")
    report = json.loads(path.read_text())
    if report.get("meta", {}).get("fingerprint") != fingerprint:
        raise InputError(f"{path} was measured on another model or config; run the sweep "
                         "again with --force")
    return report


def _recorded_float_weights(path: str | None, hops: int = 4) -> str | None:
    """The float weights a quantized checkpoint was made from: its config's ``model_path``,
    followed through checkpoints made from checkpoints (a selection of a QAT model of float
    weights). None where no float file is recorded or it is gone."""
    for _ in range(hops):
        if path is None or not Path(path).is_file():
            return None
        try:
            ckpt = read_checkpoint(path)
        except InputError:
            return None
        if ckpt.get("kind") != "quantized":
            return path
        path = ckpt.get("config", {}).get("model_path")
    return None


def reference_model(session: Session) -> tuple[nn.Module | None, str]:
    """The float model the user started from, which the tolerance is measured against, and
    where it came from. None where the quantized model with its quantizers off is that model:
    it was quantized here from float weights or from the hooks' own model. A QAT checkpoint's
    weights with quantizers off are not: they were trained to be quantized."""
    cfg = session.cfg
    path = cfg.sensitivity.reference
    how = "sensitivity.reference"
    if path is None and cfg.model_path is not None:
        ckpt = read_checkpoint(cfg.model_path)
        if ckpt.get("kind") != "quantized":
            return None, "the float weights model_path names"
        recorded = ckpt.get("config", {}).get("model_path")
        path, how = _recorded_float_weights(recorded), "recorded in the checkpoint"
        if path is None:
            if recorded is None and session.hooks.returns_trained_model:
                # quantized from the hooks' own model: the model as get_model returns it
                model = session.hooks.get_model(dataclasses.replace(cfg, model_path=None))
                return model.to(session.device).eval(), f"get_model in {cfg.hooks}"
            logger.warning("%s records no float weights that exist (%s): the float baseline is "
                           "its own weights with quantizers off, which QAT trained to be "
                           "quantized; set sensitivity.reference to the float weights",
                           cfg.model_path, recorded)
            return None, "the checkpoint's weights with quantizers off"
    elif path is None:
        return None, "the float model quantized here"
    float_cfg = dataclasses.replace(cfg, model_path=path)
    model = session.hooks.get_model(float_cfg)
    if not session.hooks.model_loads_itself:
        load_weights(model, path, strict=cfg.strict_load)
    return model.to(session.device).eval(), f"float weights {path} ({how})"


def _analyse(args: argparse.Namespace) -> None:
    session = start_session(
        args, default_output="runs/sensitivity", force=args.force or args.reselect,
        resumable=False, join_group=False,
        validate=lambda cfg, hooks: require_trained_model(hooks, cfg, "sensitivity_analysis.py"))
    cfg, out = session.cfg, session.out
    fingerprint = _fingerprint(cfg)
    my_rows = out / f"sensitivity.rows.rank{rank()}.jsonl"
    finished = _finished_sweep(out, fingerprint) if args.reselect else None
    if finished is not None:     # every layer measured: only the selection runs again
        done = {r["layer"]: {k: r[k] for k in _MEASURED if k in r} for r in finished["layers"]}
        logger.info("selecting again from the %d layers measured in %s", len(done),
                    out / "sensitivity.json")
    elif args.force:
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
    layers = quant.execution_order(model, example_input(session, batches))

    picked: dict[str, Any] = {}
    if finished is not None:
        picked["name"] = finished["meta"]["metric"]
        picked["higher"] = finished["meta"]["higher_is_better"]

    def measure() -> float:
        metrics = evaluate_model(session, model, batches, criterion)
        if not picked:
            picked["name"], picked["higher"] = pick_metric(metrics, cfg.metric)
        return metrics[picked["name"]]

    # rank 0 alone measures the baselines (and later selects): it takes the smaller share
    baseline: dict[str, Any] = {}
    if finished is not None:
        baseline = dict(finished["baseline"])
    elif rank() == 0:
        with quant.layers_enabled(model, layers, False):
            baseline["quantizers_off"] = measure()
        reference, reference_source = reference_model(session)
        baseline["float"] = baseline["quantizers_off"] if reference is None else \
            evaluate_model(session, reference, batches, criterion)[picked["name"]]
        baseline["quantized"] = measure()
        baseline["reference"] = reference_source   # where "float" came from
        logger.info("%s: float %.4f (%s), quantizers off %.4f, fully quantized %.4f; %d layers "
                    "(%s), %d already measured", picked["name"], baseline["float"],
                    reference_source, baseline["quantizers_off"], baseline["quantized"],
                    len(layers), source, len(done))
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
                 "model_source": source, "metric": metric, "fingerprint": _fingerprint(cfg),
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
    parser.add_argument("--reselect", action="store_true",
                        help="select again from the finished sweep in output_dir (another "
                        "sensitivity.tolerance or max_float_layers): only the selection steps "
                        "are measured")
    return run_cli(_analyse, parser, argv)
