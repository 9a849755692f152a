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

``--links N`` measures how far the plateau is: the W4A4 control trained again N - 1 times, each
link from the previous link's final model with the same seed (``<out-dir>/w4a4_control_link<k>/``);
the gain of each link over the one before says how much more float training that recipe would
still find. A rerun keeps finished links.
"""
from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import save_result
from bench.qat_modes import (BATCH, EPOCHS, LR, SCENES, Bench, mode_recipes, run_recipe,
                              threads_per_job)
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
    parser.add_argument("--links", type=int, default=1,
                        help="W4A4 controls in a chain, each from the one before (module "
                             "docstring); 1: the benchmark's controls only")
    parser.add_argument("--json", default=str(ROOT / "bench/results/float_plateau.json"))
    args = parser.parse_args()
    if args.links < 1:
        parser.error(f"--links takes N >= 1, got {args.links}")
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
        "command": f"python -m bench.float_plateau --weights {args.weights} --out-dir {out} "
                   f"--seeds {' '.join(map(str, args.seeds))}"
                   + (f" --links {args.links}" if args.links > 1 else ""),
        "weights": args.weights, "metric": summary["metric"], "split": split,
        "float": float_value, "float_val": summary["float"]["val"],
        "controls": {s: {"mean": row["mean"], "std": row["std"], "n": row["n"],
                         "epochs": summary["epochs"][s], "batch": summary["batch"][s],
                         "lr": summary["lr"][s], "train_images": summary["train_images"][s],
                         "recipe": summary["mode_recipes"][s].get("control", {}),
                         "gain_over_float": gains[s]} for s, row in controls.items()},
        "goal": f"every control gains at most {GAIN_AT_MOST} over float (mean of seeds)",
        "met": all(g <= GAIN_AT_MOST for g in gains.values())}
    if args.links > 1:
        bench = Bench(Path(args.config), Path(args.weights), out, [])
        links = chain(bench, table["runs"]["w4a4"]["control"], args.seeds, args.links,
                      args.jobs)
        result["w4a4_chain"] = rows = chain_summary(float_value, links)
        result["w4a4_plateau"] = plateau(bench, rows, args.weights, args.seeds[0])
    save_result(result, args.json)


def chain(bench: Any, first: list[dict[str, Any]], seeds: list[int], links: int, jobs: int
          ) -> list[list[dict[str, Any]]]:
    """The W4A4 control's results per link and seed: ``first`` (the benchmark's own controls,
    one per seed, in ``bench.out``) and links 2 to ``links``, each seed trained from its
    previous link's ``last.pt``, ``jobs`` at a time; finished links are kept."""
    setting, run = "w4a4", "control"
    recipe = control_recipe(bench)
    threads = threads_per_job(jobs)
    done = [first]
    for link in range(2, links + 1):
        def one(seed: int, link: int = link) -> dict[str, Any]:
            start = link_dir(bench, link - 1, seed, recipe) / "last.pt"
            asked = {**recipe, "model_path": str(start)}
            out = link_dir(bench, link, seed, recipe)
            return (bench.kept(out, setting, run, seed, asked)
                    or bench.train(out, setting, run, seed, asked, threads))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            done.append(list(pool.map(one, seeds)))
    return done


def control_recipe(bench: Any) -> dict[str, Any]:
    """The W4A4 control's recipe, as the benchmark runs it."""
    lr = {s: LR.get(s, bench.session.cfg.qat.lr) for s in EPOCHS}
    return run_recipe("w4a4", "control", EPOCHS, BATCH, lr, SCENES, {}, mode_recipes(EPOCHS, []))


def link_dir(bench: Any, link: int, seed: int, recipe: dict[str, Any]) -> Path:
    """Link 1 is the benchmark's control; link k > 1 lives in ``w4a4_control_link<k>/``."""
    path = bench.run_dir("w4a4", "control", seed, recipe)
    return path if link == 1 else path.parent / f"w4a4_control_link{link}" / path.name


def chain_summary(float_value: float, links: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each link's mean and spread over seeds and its gain over the link before (link 1: over
    float)."""
    rows, before = [], float_value
    for k, results in enumerate(links, start=1):
        values = [r["report"] for r in results]
        mean = statistics.fmean(values)
        rows.append({"link": k, "per_seed": values, "mean": mean,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "gain_over_previous": mean - before,
                     "met": mean - before <= GAIN_AT_MOST})
        before = mean
    return rows


def plateau(bench: Any, rows: list[dict[str, Any]], weights: str, seed: int
            ) -> dict[str, Any] | None:
    """The chain's float model at the W4A4 recipe's plateau: the link (0: the float model
    itself) that the next link improves by at most 0.3, and ``seed``'s weights of it; None
    while every link still gains more."""
    link = next((row["link"] - 1 for row in rows if row["met"]), None)
    if link is None:
        return None
    model = (weights if link == 0
             else str(link_dir(bench, link, seed, control_recipe(bench)) / "last.pt"))
    return {"link": link, "seed": seed, "model": model}


if __name__ == "__main__":
    main()
