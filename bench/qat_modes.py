"""What each QAT mode is worth at W8A8, W4A8 and W4A4, against PTQ and a float fine-tune.

    python -m bench.qat_modes [--float-weights runs/float/best.pt] [--out-dir runs/bench_qat]
                              [--settings w8a8 w4a8 w4a4] [--seeds 0 1 2]
                              [--epochs w8a8=3 w4a8=3 w4a4=10] [--batch w8a8=8 w4a8=8 w4a4=2]
                              [--lr w4a4=LR] [--calib-method METHOD]
                              [--train-images w8a8=160 w4a8=160 w4a4=320]
                              [--jobs 2]

For each bit setting: PTQ with every calibration method, percentile at each of
``calib.percentiles`` (deterministic: one calib split), then for each seed the three QAT modes
and a *float fine-tune control* (``--mode float`` with QAT's epochs, learning rate, schedule and
frozen batch norm, no quantizers), all through qat_train.py with config.yaml. ``calib`` mode
calibrates with the PTQ method that did best on val at that bit width (or ``--calib-method``),
and ``stats`` starts from that method's ranges. Nothing reported is chosen on the data it is
reported on: methods are chosen on val, and every figure is the *final* model on the held-out
test split (the hooks' ``test`` split; a hooks file without one reports val, and the JSON
says so).

Each bit setting has its recipe (``EPOCHS``, ``BATCH``, ``LR``, ``SCENES``, ``SETTING_RECIPES``,
``MODE_RECIPES``), every part chosen on val before the benchmark ran; the figures behind each
choice, with their commands, are in bench/QAT_MODES.md. 3 epochs over half the 320 training
scenes suffice at 8-bit activations; W4A4 gets the whole QAT budget, 10 epochs over all 320, in
batches of 2 rather than 8 at a higher learning rate, 8e-3 rather than the config's 1e-3. At
W4A4 QAT trains on whole 128x256 scenes rather than the float recipe's 128x128 crops, and so
does its control (on crops its modes ended lower on val; at W4A8 whole scenes changed nothing
measurable). At W4A4 ``stats`` tracks its ranges for the first 2 epochs only, over a longer
moving average (tracking is what 4-bit activations punish), and ``direct`` learns its ranges for
the first 5 epochs at 30 times the learning rate, then trains against them fixed, its weight
ranges following its weights. The batch size is the hooks' ``user.batch_size``
(``my_model.py``).

Each run keeps its result as it finishes (``<out-dir>/<setting>/<run>_seed<n>/``; the control,
which has no quantizers, once per seed, epoch count, batch, learning rate and crop in
``<out-dir>/control_<epochs>ep_b<batch>_lr<lr>[_crop<h>x<w>]_seed<n>/``): a rerun after a stop
only does what is missing, and resumes an unfinished training from its ``last.pt``. A finished
run whose own config (the ``config.yaml`` in its directory) differs in any key from what the
benchmark would run now, the config file's defaults included, is an error, never a figure.
``--jobs`` runs trainings side by side, each in its own process with its share of the cores:
small-batch training does not keep many threads busy. Output: a table (mean and standard
deviation over seeds), bench/results/qat_modes.json, and bench/results/qat_modes.png (each
mode's per-epoch val metric against float and best PTQ); with another ``--out-dir``,
``<out-dir>/qat_modes.json`` and ``.png``. The cost of one QAT step relative to a float step is
measured too (goal <= 1.3).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from pidnet import quant
from pidnet.checkpoint import load_weights
from pidnet.cli import EXIT_BAD_INPUT, setup_logging
from pidnet.config import CHOICES, Config, config_to_dict, load_config
from pidnet.demo import QAT_MODES
from pidnet.engine import pick_metric, to_device
from pidnet.errors import InputError
from pidnet.hooks import load_hooks
from pidnet.pipeline import (Session, build_criterion, calibrations, evaluate_model, example_input,
                             load_quantized, qat_start, quantized_copy_with_stats)
from pidnet.plots import plot_qat_settings
from pidnet.reports import format_table, write_json

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
EPOCHS = {"w8a8": 3, "w4a8": 3, "w4a4": 10}   # QAT epochs per setting (module docstring)
BATCH = {"w8a8": 8, "w4a8": 8, "w4a4": 2}     # training batch per setting (module docstring)
SCENES = {"w8a8": 160, "w4a8": 160, "w4a4": 320}   # training scenes per setting (docstring)
LR = {"w4a4": 0.008}                          # qat.lr where not the config's (docstring)
# a mode's ranges where not the config's (docstring): stats' tracking, how long and how fast
# direct learns them, and its weight ranges following the weights; a --set of a key wins
MODE_RECIPES = {"w4a4": {"stats": {"qat.freeze_ranges_epochs": 8, "qat.range_momentum": 0.975},
                         "direct": {"qat.freeze_ranges_epochs": 5, "qat.range_lr_scale": 30,
                                    "qat.track_weight_ranges": True}}}
# what every run of a setting adds, its control's included (docstring): W4A4 trains on whole
# 128x256 scenes, not the float recipe's 128x128 crops
SETTING_RECIPES = {"w4a4": {"user.crop_size": [128, 256]}}
RUNS = (*QAT_MODES, "control")
Recipe = dict[str, Any]   # config key -> value: how a run trains, beyond its mode and seed
OUT_DIR = "runs/bench_qat"
logger = logging.getLogger("bench.qat_modes")


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


class Bench:
    """One float model, one config; evaluates models on val and on the held-out split."""

    def __init__(self, config: Path, weights: Path, out: Path, overrides: list[str]) -> None:
        self.config, self.weights, self.out, self.overrides = config, weights, out, overrides
        self._in_process = threading.Lock()   # evaluations here, one at a time
        cfg = load_config(config, overrides)
        self.file_qat = load_config(config).qat   # the config file's own, before any --set
        self.hooks = load_hooks(cfg.hooks)
        self.session = Session(cfg, out, self.hooks, torch.device("cpu"))
        self.criterion = build_criterion(self.session)
        self.val = self.hooks.get_data_loader(cfg, "val")
        try:
            self.test = self.hooks.get_data_loader(cfg, "test")
            self.report_split = "test"
        except (InputError, KeyError, ValueError) as exc:
            logger.warning("no held-out split (%s): reporting final-epoch val figures", exc)
            self.test, self.report_split = self.val, "val"
        self.metric, self.higher = pick_metric(self.evaluate(self.float_model(), "val"),
                                               cfg.metric)

    def cfg(self, setting: str) -> Config:
        weight_bits, act_bits = SETTINGS[setting]
        quant_cfg = dataclasses.replace(self.session.cfg.quant, weight_bits=weight_bits,
                                        act_bits=act_bits)
        return dataclasses.replace(self.session.cfg, quant=quant_cfg)

    def session_for(self, setting: str) -> Session:
        return dataclasses.replace(self.session, cfg=self.cfg(setting))

    def float_model(self) -> torch.nn.Module:
        model = self.hooks.get_model(self.session.cfg)
        load_weights(model, self.weights)
        return model

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        loader = self.val if split == "val" else self.test
        return evaluate_model(self.session, model, loader, self.criterion)

    def both(self, model: torch.nn.Module) -> dict[str, float]:
        return {"val": self.evaluate(model, "val")[self.metric],
                "test": self.evaluate(model, "test")[self.metric]}

    def float_figures(self) -> dict[str, float]:
        path = self.out / "float.json"
        if (done := _load_json(path)) is None:
            done = self.both(self.float_model())
            write_json(path, done)
        return done

    def ptq(self, setting: str) -> dict[str, Any]:
        """Every calibration method at ``setting`` on val and test; the best on val."""
        path = self.out / setting / "ptq.json"
        done = _load_json(path)
        if done is not None and "configs" in done:   # older files lack each method's config
            return done
        session = self.session_for(setting)
        cfg = session.cfg
        model, stats, _ = quantized_copy_with_stats(
            session, self.float_model(), self.hooks.get_data_loader(cfg, "calib"))
        methods, configs = {}, {}
        for calibration in calibrations(cfg.calib):
            calibration.apply(model, stats)
            methods[calibration.name] = self.both(model)
            configs[calibration.name] = calibration.config()
            logger.info("%s ptq %s: val %.2f test %.2f", setting, calibration.name,
                        methods[calibration.name]["val"], methods[calibration.name]["test"])
        pick = max if self.higher else min
        best = pick(methods, key=lambda m: methods[m]["val"])
        done = {"methods": methods, "best_on_val": best, "configs": configs}
        write_json(path, done)
        return done

    def run_dir(self, setting: str, run: str, seed: int, recipe: Recipe) -> Path:
        # the control has no quantizers: one run per seed and recipe serves every setting
        if run != "control":
            return self.out / setting / f"{run}_seed{seed}"
        crop = recipe.get("user.crop_size")
        crop_part = f"_crop{crop[0]}x{crop[1]}" if crop else ""
        return self.out / (f"control_{recipe['qat.epochs']}ep_b{recipe['user.batch_size']}"
                           f"_lr{recipe['qat.lr']:g}{crop_part}_seed{seed}")

    def kept(self, out: Path, setting: str, run: str, seed: int, recipe: Recipe
             ) -> dict[str, Any] | None:
        """A finished run's result, if it trained as asked (an error if not)."""
        if (done := _load_json(out / "bench.json")) is not None:
            asked = load_config(self.config, self.run_sets(out, setting, run, seed, recipe))
            check_trained_as_asked(out, asked, run)
        return done

    def run_sets(self, out: Path, setting: str, run: str, seed: int, recipe: Recipe
                 ) -> list[str]:
        """The ``--set`` items of one training: the benchmark's, then the run's recipe (a
        quantized run's names its calibration, ``qat_start``)."""
        cfg = self.session.cfg
        epochs = recipe["qat.epochs"]
        weight_bits, act_bits = SETTINGS[setting]
        frozen_bn = frozen_bn_epochs(epochs, self.file_qat, cfg.qat, self.overrides)
        # the recipe comes last: its keys (stats' tracking, say) win over the defaults here
        sets = [*self.overrides, f"model_path={self.weights}", f"output_dir={out}",
                f"seed={seed}", f"quant.weight_bits={weight_bits}", f"quant.act_bits={act_bits}",
                f"qat.freeze_bn_epochs={frozen_bn}",
                f"qat.freeze_ranges_epochs={min(epochs, cfg.qat.freeze_ranges_epochs)}",
                *(f"{key}={value}" for key, value in recipe.items())]
        if run == "control":   # the same schedule as QAT, no quantizers
            sets = [item for item in sets if not item.startswith("quant.")]
            # and, as QAT, no pass over the train split for batch-norm statistics: where a
            # config leaves the control live epochs before it freezes, train.precise_bn would
            # run one there, which QAT never does (frozen throughout, train.py skips it); nor
            # the float recipe's own loader for its frozen phase: QAT's data throughout
            sets += [f"train.epochs={epochs}", f"train.lr={recipe['qat.lr']}",
                     f"train.schedule={cfg.qat.schedule}",
                     f"train.freeze_bn_epochs={frozen_bn}", "train.precise_bn=false",
                     "train.final_phase_user={}"]
        return sets

    def train(self, out: Path, setting: str, run: str, seed: int, recipe: Recipe,
              threads: int) -> dict[str, Any]:
        """One training through qat_train.py (``threads`` torch threads), then its final model
        on the report split. Safe to call from several threads at once: the trainings run in
        their own processes, the evaluations here one at a time."""
        mode = "float" if run == "control" else run
        command = [sys.executable, str(ROOT / "qat_train.py"), "--mode", mode,
                   "--config", str(self.config), "--resume"]
        for item in self.run_sets(out, setting, run, seed, recipe):
            command += ["--set", item]
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out.parent / f"{out.name}.log", "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} exited {code}; "
                               f"see {out.parent / out.name}.log")
        seconds = round(time.perf_counter() - start, 1)
        results = json.loads((out / "results.json").read_text())
        with self._in_process:
            final = self.final_model(out / "last.pt", setting, quantized=run != "control")
            report = self.evaluate(final, "test")[self.metric]
        done = {"run": run, "seed": seed, "seconds": seconds, "threads": threads,
                "report": report, "final_val": results["final"][self.metric],
                "start_val": results.get("baselines", {}).get("start", {}).get(self.metric),
                "curve": [e[self.metric] for e in results["epochs"]], "command": command}
        write_json(out / "bench.json", done)
        logger.info("%s %s seed %d: %s %.2f (%.0f s)", setting, run, seed, self.report_split,
                    done["report"], done["seconds"])
        return done

    def final_model(self, path: Path, setting: str, quantized: bool) -> torch.nn.Module:
        if quantized:
            return load_quantized(self.session_for(setting), path)
        model = self.hooks.get_model(self.session.cfg)
        load_weights(model, path)
        return model


def frozen_bn_epochs(epochs: int, file_qat: Any, qat: Any, overrides: list[str]) -> int:
    """Epochs with batch norm frozen in a run of ``epochs``: all of them where the config file
    freezes all of its QAT epochs (config.yaml does), else the last ``qat.freeze_bn_epochs``.
    A ``--set qat.epochs``, which a longer ``qat.freeze_ranges_epochs`` needs to validate, does
    not make that "all" a part; a ``--set qat.freeze_bn_epochs`` is taken as it is."""
    if (file_qat.freeze_bn_epochs >= file_qat.epochs
            and not any(item.startswith("qat.freeze_bn_epochs=") for item in overrides)):
        return epochs
    return min(epochs, qat.freeze_bn_epochs)


# not compared: where a run wrote and read (a kept run may be copied from another
# directory), and for the float control the keys of the quantization it never inserts
NOT_COMPARED = ("output_dir", "model_path")
CONTROL_IGNORES = ("qat.", "quant.", "calib.")


def check_trained_as_asked(out: Path, asked: Config, run: str) -> None:
    """A kept run must have trained as asked: its own resolved config (``config.yaml`` in its
    directory, written by qat_train.py) must hold every value the benchmark would run it with
    now, the config file's defaults included, so a changed default retrains rather than
    mixing two recipes in one table."""
    path = out / "config.yaml"
    # a key the run's config lacks was added since, with a default that keeps the behaviour
    # of before: the schema's default
    saved = {**_flatten(config_to_dict(Config())),
             **(_flatten(yaml.safe_load(path.read_text())) if path.exists() else {})}
    differ = [f"{key} {saved.get(key, 'unset')} (asked {value})"
              for key, value in _flatten(config_to_dict(asked)).items()
              if key not in NOT_COMPARED and saved.get(key, "unset") != value
              and not (run == "control" and key.startswith(CONTROL_IGNORES))]
    if differ:
        raise InputError(f"{out} was trained with {', '.join(differ[:3])}"
                         f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}: use "
                         "another --out-dir, or delete that run to retrain it")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: ``{"qat": {"lr": 1}}`` -> ``{"qat.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(float_fig: dict, ptq: dict[str, dict], runs: dict[str, dict[str, list[dict]]],
              higher: bool) -> tuple[list[dict], dict[str, Any]]:
    """Table rows (mean, std over seeds, on the report split) and the benchmark's goals."""
    sign = 1 if higher else -1
    float_value = float_fig["test"]
    rows: list[dict[str, Any]] = [{"setting": "-", "run": "float", "mean": float_value,
                                   "std": 0.0, "n": 1}]
    goals: dict[str, Any] = {}
    for setting, by_run in runs.items():
        methods = ptq[setting]["methods"]
        best = ptq[setting]["best_on_val"]
        for method, fig in methods.items():
            rows.append({"setting": setting, "run": f"ptq {method}" + (" *" if method == best
                                                                      else ""),
                         "mean": fig["test"], "std": 0.0, "n": 1})
        means = {}
        for run, results in by_run.items():
            if not results:
                continue
            mean, std = _mean_std([r["report"] for r in results])
            means[run] = (mean, std)
            rows.append({"setting": setting, "run": "control" if run == "control"
                         else f"qat {run}", "mean": mean, "std": std, "n": len(results),
                         "start": "" if run == "control" else
                         statistics.fmean(r["start_val"] for r in results)})
        modes = {m: means[m] for m in QAT_MODES if m in means}
        if not modes:
            continue
        best_ptq = methods[best]["test"]
        if setting == "w8a8":
            floor = float_value - 0.3 * sign
            control = means.get("control", (None, 0))[0]
            goals[setting] = {
                "float_minus_0.3": floor,
                "control_minus_0.3": None if control is None else control - 0.3 * sign,
                "per_mode_margin_vs_float": {m: sign * (v[0] - floor) for m, v in modes.items()},
                "per_mode_margin_vs_control": {} if control is None else
                {m: sign * (v[0] - (control - 0.3 * sign)) for m, v in modes.items()}}
            goals[setting]["met"] = all(
                x >= 0 for d in ("per_mode_margin_vs_float", "per_mode_margin_vs_control")
                for x in goals[setting][d].values())
        else:
            floor = float_value - 0.2 * (float_value - best_ptq)
            top = (max if higher else min)(v[0] for v in modes.values())
            goals[setting] = {
                "best_ptq": best_ptq, "recovery_floor": floor,
                "per_mode_margin_vs_floor": {m: sign * (v[0] - floor) for m, v in modes.items()},
                "best_mode_gap_to_float": sign * (float_value - top)}
            goals[setting]["met"] = (all(x >= 0 for x in
                                         goals[setting]["per_mode_margin_vs_floor"].values())
                                     and goals[setting]["best_mode_gap_to_float"] <= 2.0)
    return rows, goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--float-weights", default=None,
                        help="trained float weights (default: train them first)")
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--epochs", nargs="+", default=[f"{s}={n}" for s, n in EPOCHS.items()],
                        metavar="SETTING=N", help="QAT (and control) epochs per bit setting; "
                        "a bare N sets every setting")
    parser.add_argument("--batch", nargs="+", default=[f"{s}={n}" for s, n in BATCH.items()],
                        metavar="SETTING=N", help="training batch per bit setting (it sets "
                        "user.batch_size over any --set); a bare N sets every setting")
    parser.add_argument("--lr", nargs="+", default=[f"{s}={x}" for s, x in LR.items()],
                        metavar="SETTING=LR", help="QAT (and control) learning rate per bit "
                        "setting, over config.yaml's qat.lr; a bare LR sets every setting")
    parser.add_argument("--calib-method", default=None, choices=CHOICES["calib.method"],
                        help="calibration method of the calib mode and stats' start (default: "
                        "the PTQ method best on val at each setting)")
    parser.add_argument("--train-images", nargs="+",
                        default=[f"{s}={n}" for s, n in SCENES.items()], metavar="SETTING=N",
                        help="training scenes per epoch per bit setting (a part of the train "
                        "split where it suffices); a bare N sets every setting")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (e.g. qat.range_momentum=0.975)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainings at once, sharing the CPU cores (each gets cores / "
                        "jobs torch threads)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--json", default=None,
                        help="results (and the plot beside them); default: "
                        "bench/results/qat_modes.json for the default --out-dir, else "
                        "<out-dir>/qat_modes.json, so a side run never replaces the benchmark's")
    args = parser.parse_args(argv)
    epochs = per_setting(args.epochs, EPOCHS, "--epochs", parser)
    batch = per_setting(args.batch, BATCH, "--batch", parser)
    scenes = per_setting(args.train_images, SCENES, "--train-images", parser)
    lr = per_setting(args.lr, dict.fromkeys(SETTINGS), "--lr", parser, float)   # None: config's
    if any(item.startswith("qat.lr=") for item in args.set):
        parser.error("set the learning rate with --lr (per setting), not --set qat.lr")
    if args.jobs < 1:
        parser.error(f"--jobs takes N >= 1, got {args.jobs}")
    setup_logging(0)
    torch.set_num_threads(2)
    out = Path(args.out_dir)
    results = Path(args.json or (ROOT / "bench/results/qat_modes.json" if args.out_dir == OUT_DIR
                                 else out / "qat_modes.json"))
    started = time.perf_counter()

    weights = args.float_weights
    if weights is None:
        weights = out / "float" / "best.pt"
        if not (out / "float" / "results.json").exists():
            subprocess.check_call([sys.executable, str(ROOT / "qat_train.py"), "--mode", "float",
                                   "--config", args.config, "--resume",
                                   "--set", f"output_dir={out / 'float'}"])
    bench = Bench(Path(args.config), Path(weights), out, args.set)
    float_fig = bench.float_figures()
    ptq = {setting: bench.ptq(setting) for setting in args.settings}
    lr = {s: bench.session.cfg.qat.lr if x is None else x for s, x in lr.items()}
    calibration = {s: ({"calib.method": args.calib_method} if args.calib_method
                       else ptq[s]["configs"][ptq[s]["best_on_val"]]) for s in ptq}
    recipes = mode_recipes(epochs, args.set)
    runs = run_all(bench, args.settings, args.runs, args.seeds, epochs, batch, lr, scenes,
                   calibration, args.jobs, recipes)
    rows, goals = summarize(float_fig, ptq, runs, bench.higher)
    speed = step_time_ratio(bench, Path(weights), args.steps)
    table = format_table(rows, ["setting", "run", "mean", "std", "n", "start"])
    print(f"{bench.metric} on the {bench.report_split} split, final epoch, mean and std over "
          f"seeds {args.seeds}; epochs {epochs}, batch {batch}, learning rate {lr}, training "
          f"scenes {scenes}; * = PTQ method chosen on val (the calib mode's method)")
    print(table)
    cfg = bench.session.cfg
    summary = {
        "metric": bench.metric, "report_split": bench.report_split, "seeds": args.seeds,
        "epochs": epochs, "batch": batch, "lr": lr, "calibration": calibration,
        "mode_recipes": recipes,
        "train_images": scenes,
        "weights": str(weights), "overrides": args.set, "qat": dataclasses.asdict(cfg.qat),
        "float": float_fig,
        "goals": goals, "qat_step_over_float_step": speed["ratio"], "step_times": speed,
        "minutes": round((time.perf_counter() - started) / 60, 1), "jobs": args.jobs,
        "torch_threads": torch.get_num_threads()}
    print(json.dumps(goals, indent=2))
    curves = {s: {"float": float_fig["val"],
                  "ptq": ptq[s]["methods"][ptq[s]["best_on_val"]]["val"],
                  "ptq_method": ptq[s]["best_on_val"],
                  "modes": {r: [statistics.fmean(c) for c in zip(*(x["curve"] for x in res))]
                            for r, res in runs[s].items() if res}} for s in runs}
    plot = plot_qat_settings(curves, bench.metric, results.with_suffix(".png"))
    write_json(results, {"summary": summary, "rows": rows, "ptq": ptq, "runs": runs,
                         "curves": curves, "plot": str(plot)})
    print(results)


def run_all(bench: Bench, settings: list[str], run_names: list[str], seeds: list[int],
            epochs: dict[str, int], batch: dict[str, int], lr: dict[str, float],
            scenes: dict[str, int], calibration: dict[str, Recipe], jobs: int,
            recipes: dict[str, dict[str, Recipe]] | None = None
            ) -> dict[str, dict[str, list[dict]]]:
    """Every (setting, run, seed): kept results as they are (each checked against what is
    asked before anything trains), the rest trained ``jobs`` at a time. A directory shared
    by several settings (the control) trains once. ``calibration``: the config keys of each
    setting's PTQ choice, which its quantized runs add to their recipe; ``recipes``: what each
    mode's runs of a setting add to theirs (``mode_recipes``)."""
    threads = threads_per_job(jobs)
    cells, todo, results = [], {}, {}
    for setting in settings:
        for seed in seeds:
            for run in run_names:
                recipe = run_recipe(setting, run, epochs, batch, lr, scenes, calibration,
                                    recipes)
                out = bench.run_dir(setting, run, seed, recipe)
                cells.append((setting, run, out))
                if out in results or out in todo:
                    continue
                if (done := bench.kept(out, setting, run, seed, recipe)) is not None:
                    results[out] = done
                else:
                    todo[out] = (setting, run, seed, recipe)
    if todo:
        logger.info("%d runs to train, %d at a time with %d torch threads each", len(todo),
                    jobs, threads)
    # the longest first, so the pool does not end on one long training alone
    order = sorted(todo, key=lambda out: -epochs[todo[out][0]])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {out: pool.submit(bench.train, out, *todo[out], threads=threads)
                   for out in order}
        try:
            results.update({out: future.result() for out, future in futures.items()})
        except BaseException:
            pool.shutdown(cancel_futures=True)   # the running ones finish and are kept
            raise
    runs: dict[str, dict[str, list[dict]]] = {s: {r: [] for r in run_names} for s in settings}
    for setting, run, out in cells:
        runs[setting][run].append(results[out])
    return runs


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` trainings sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_recipe(setting: str, run: str, epochs: dict[str, int], batch: dict[str, int],
               lr: dict[str, float], scenes: dict[str, int], calibration: dict[str, Recipe],
               recipes: dict[str, dict[str, Recipe]] | None = None) -> Recipe:
    """What one run of ``setting`` trains with, beyond its mode and seed (``run_all``)."""
    recipe = {"qat.epochs": epochs[setting], "qat.lr": lr[setting],
              "user.train_images": scenes[setting], "user.batch_size": batch[setting]}
    if run != "control":   # no quantizers to calibrate: one control per recipe
        recipe.update(qat_start(calibration[setting]))
    recipe.update((recipes or {}).get(setting, {}).get(run, {}))
    return recipe


def mode_recipes(epochs: dict[str, int], overrides: list[str]) -> dict[str, dict[str, Recipe]]:
    """Setting -> run -> what that run adds to its recipe: ``SETTING_RECIPES`` and
    ``MODE_RECIPES``, less any key a ``--set`` names (that value serves every run), the ranges
    frozen for at most the run's epochs. Runs that add nothing are left out."""
    named = {item.partition("=")[0] for item in overrides}
    recipes: dict[str, dict[str, Recipe]] = {}
    for setting in epochs:
        recipes[setting] = {}
        for run in RUNS:
            recipe = {**SETTING_RECIPES.get(setting, {}),
                      **MODE_RECIPES.get(setting, {}).get(run, {})}
            recipe = {key: min(value, epochs[setting]) if key == "qat.freeze_ranges_epochs"
                      else value for key, value in recipe.items() if key not in named}
            if recipe:
                recipes[setting][run] = recipe
    return recipes


def per_setting(items: list[str], defaults: dict[str, Any], flag: str,
                parser: argparse.ArgumentParser, kind: type = int) -> dict[str, Any]:
    """``SETTING=X`` items over the defaults; a bare ``X`` sets every setting. ``X`` is a
    positive ``kind``."""
    values = dict(defaults)
    for item in items:
        setting, _, text = item.rpartition("=")
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (setting and setting not in SETTINGS) or value is None or not 0 < value < math.inf:
            parser.error(f"{flag} takes SETTING=X or X with SETTING one of "
                         f"{', '.join(SETTINGS)} and X a positive {kind.__name__}, got {item!r}")
        values.update({s: value for s in ([setting] if setting else SETTINGS)})
    return values


def step_time_ratio(bench: Bench, weights: Path, steps: int) -> dict[str, float]:
    """Median time of one training step (forward, backward, SGD) of the fake-quant model over
    the float model's, the two interleaved on the same batches."""
    cfg = bench.session.cfg
    float_model = bench.float_model()
    loader = bench.hooks.get_data_loader(cfg, "train")
    qat_model = quant.insert_quantizers(copy.deepcopy(float_model), cfg.quant, cfg.export.target,
                                        example_input(bench.session, loader))
    stats = quant.collect_stats(qat_model, loader, torch.device("cpu"), 2)
    quant.apply_ranges(qat_model, stats, cfg.calib.method)
    if cfg.qat.track_weight_ranges:
        quant.track_weight_ranges(qat_model, cfg.quant.weight_range)
    models = {"float": float_model, "qat": qat_model}
    optims = {k: torch.optim.SGD(m.parameters(), lr=1e-5) for k, m in models.items()}
    times: dict[str, list[float]] = {"float": [], "qat": []}
    batches = iter(loader)
    for i in range(steps + 2):
        inputs, targets = next(batches)
        for name in ("float", "qat") if i % 2 else ("qat", "float"):
            model = models[name].train()
            start = time.perf_counter()
            loss = bench.criterion(model(inputs), to_device(targets, torch.device("cpu")))
            optims[name].zero_grad()
            loss.backward()
            optims[name].step()
            if i >= 2:                                     # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    f, q = statistics.median(times["float"]), statistics.median(times["qat"])
    return {"float_step_s": f, "qat_step_s": q, "ratio": q / f, "steps": steps}


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:   # a kept run that was trained otherwise than asked
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
