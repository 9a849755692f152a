"""The QAT benchmark's arithmetic on known figures: goals (summarize), epochs, batch and
learning rate per setting, kept runs checked against what is asked, which runs train."""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bench.qat_modes import (BATCH, EPOCHS, SCENES, Bench, check_trained_as_asked,
                             frozen_bn_epochs, main, mode_recipes, per_setting, run_all,
                             summarize)
from pidnet.config import load_config, save_config
from pidnet.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
LR = {"w8a8": 0.001, "w4a8": 0.001, "w4a4": 0.008}
ENTROPY = {"calib.method": "entropy"}   # a setting's calibration, as run_all takes it


def _runs(**means):
    return {run: [{"report": m + d, "start_val": 1.0} for d in (-0.5, 0.5)]
            for run, m in means.items()}


def test_goals_follow_the_issue_definitions():
    float_fig = {"val": 70.0, "test": 70.0}
    ptq = {"w8a8": {"methods": {"max": {"val": 69.0, "test": 69.5},
                                "mse": {"val": 69.8, "test": 69.6}}, "best_on_val": "mse"},
           "w4a4": {"methods": {"max": {"val": 20.0, "test": 22.0},
                                "mse": {"val": 50.0, "test": 40.0}}, "best_on_val": "mse"}}
    runs = {"w8a8": _runs(calib=69.8, stats=69.6, direct=69.9, control=70.1),
            "w4a4": _runs(calib=64.5, stats=63.0, direct=68.5, control=70.1)}
    rows, goals = summarize(float_fig, ptq, runs, higher=True)
    w8 = goals["w8a8"]
    assert w8["per_mode_margin_vs_float"]["calib"] == pytest.approx(0.1)   # 69.8 - 69.7
    assert w8["per_mode_margin_vs_control"]["stats"] == pytest.approx(-0.2)  # 69.6 - 69.8
    assert w8["met"] is False
    w4 = goals["w4a4"]
    # best PTQ is the method chosen on val, reported on test: 40 -> floor 70 - 0.2 * 30 = 64
    assert w4["best_ptq"] == 40.0 and w4["recovery_floor"] == pytest.approx(64.0)
    assert w4["per_mode_margin_vs_floor"] == pytest.approx(
        {"calib": 0.5, "stats": -1.0, "direct": 4.5})
    assert w4["best_mode_gap_to_float"] == pytest.approx(1.5)
    assert w4["met"] is False                                 # stats misses the floor
    direct = next(r for r in rows if r["setting"] == "w4a4" and r["run"] == "qat direct")
    assert direct["mean"] == pytest.approx(68.5) and direct["std"] == pytest.approx(0.7071, 1e-3)
    assert any(r["run"] == "ptq mse *" for r in rows if r["setting"] == "w4a4")


def test_epochs_batch_and_lr_per_setting_override_the_defaults():
    parser = argparse.ArgumentParser()
    assert per_setting(["w4a4=7"], EPOCHS, "--epochs", parser) == {**EPOCHS, "w4a4": 7}
    assert per_setting(["5", "w8a8=2"], EPOCHS, "--epochs", parser) == {
        "w8a8": 2, "w4a8": 5, "w4a4": 5}
    assert per_setting(["8"], BATCH, "--batch", parser) == dict.fromkeys(BATCH, 8)
    for bad in ("w2a2=3", "w4a4=0", "w4a4=x"):
        with pytest.raises(SystemExit):
            per_setting([bad], EPOCHS, "--epochs", parser)
    assert per_setting(["w4a4=2e-3"], LR, "--lr", parser, float) == {**LR, "w4a4": 0.002}
    assert per_setting(["0.004"], LR, "--lr", parser, float) == dict.fromkeys(LR, 0.004)
    for bad in ("w4a4=-1e-3", "w4a4=0", "fast", "w4a4=nan", "inf"):
        with pytest.raises(SystemExit):
            per_setting([bad], LR, "--lr", parser, float)


def test_batch_norm_stays_frozen_throughout_unless_asked_otherwise():
    file_qat = load_config(ROOT / "config.yaml").qat
    assert file_qat.freeze_bn_epochs >= file_qat.epochs              # config.yaml: all of them
    # a longer freeze of the ranges needs --set qat.epochs=10 to validate; batch norm stays
    # frozen for all 10 epochs, not for the last 3
    sets = ["qat.epochs=10", "qat.freeze_ranges_epochs=7"]
    qat = load_config(ROOT / "config.yaml", sets).qat
    assert frozen_bn_epochs(10, file_qat, qat, sets) == 10
    assert frozen_bn_epochs(3, file_qat, file_qat, []) == 3
    sets = ["qat.epochs=10", "qat.freeze_bn_epochs=2"]                # live for the first 8
    assert frozen_bn_epochs(10, file_qat, load_config(ROOT / "config.yaml", sets).qat, sets) == 2
    partial = dataclasses.replace(file_qat, freeze_bn_epochs=1)       # a file that freezes 1
    assert frozen_bn_epochs(10, partial, partial, []) == 1


def test_the_learning_rate_is_set_per_setting_not_through_set(capsys):
    # --set qat.lr would be overridden by the per-setting rate without a word: refused
    with pytest.raises(SystemExit) as exc:
        main(["--set", "qat.lr=0.004"])
    assert exc.value.code == 2 and "--lr" in capsys.readouterr().err


def test_a_kept_run_trained_otherwise_is_an_error_not_a_figure(tmp_path):
    sets = ["qat.epochs=10", "qat.lr=0.008", "user.batch_size=4", "seed=1"]
    asked = load_config(ROOT / "config.yaml", sets)
    run = tmp_path / "direct_seed1"
    run.mkdir()

    def trained(*items):
        save_config(load_config(ROOT / "config.yaml", [*sets, *items]), run / "config.yaml")

    trained(f"output_dir={tmp_path / 'elsewhere'}", "model_path=other.pt")
    check_trained_as_asked(run, asked, "direct")   # as asked, wherever it was written: kept
    trained("qat.lr=0.001")
    with pytest.raises(InputError, match=r"qat.lr 0.001 \(asked 0.008\)"):
        check_trained_as_asked(run, asked, "direct")
    # a run written before a key existed had the behaviour its schema default keeps
    trained()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["qat"]["track_weight_ranges"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    check_trained_as_asked(run, asked, "direct")
    tracked = load_config(ROOT / "config.yaml", [*sets, "qat.track_weight_ranges=true"])
    with pytest.raises(InputError, match=r"qat.track_weight_ranges False \(asked True\)"):
        check_trained_as_asked(run, tracked, "direct")
    check_trained_as_asked(run, tracked, "control")    # the float control reads no qat.*
    trained("user.batch_size=8")
    with pytest.raises(InputError, match=r"user.batch_size 8 \(asked 4\)"):
        check_trained_as_asked(run, asked, "control")


class _FakeBench:
    """run_all's view of Bench: directories, kept results, trainings (recorded, not run)."""

    run_dir = Bench.run_dir                               # the real directory names

    def __init__(self, root: Path, kept: dict[str, dict], wrong: str | None = None) -> None:
        self.out, self._kept, self.wrong, self.trained = root, kept, wrong, []
        self._lock = threading.Lock()

    def kept(self, out, setting, run, seed, recipe):
        if out.name == self.wrong:
            raise InputError(f"{out} was trained otherwise")
        return self._kept.get(out.name)

    def train(self, out, setting, run, seed, recipe, threads):
        time.sleep(0.05)                                  # the pool overlaps trainings
        with self._lock:
            self.trained.append((out.name, setting, recipe["qat.epochs"],
                                 recipe.get("calib.method"), threads, recipe["qat.lr"], recipe))
        return {"run": run, "seed": seed, "report": float(seed), "dir": out.name}


def test_run_all_trains_each_missing_run_once_and_keeps_the_rest(tmp_path):
    bench = _FakeBench(tmp_path, kept={"calib_seed0": {"report": 9.0, "dir": "kept"}})
    runs = run_all(bench, ["w8a8", "w4a8"], ["calib", "control"], [0, 1],
                   {"w8a8": 3, "w4a8": 3, "w4a4": 10}, BATCH, LR, SCENES,
                   {"w8a8": ENTROPY, "w4a8": {"calib.method": "percentile",
                                              "calib.percentile": 99.5}}, jobs=2)
    # the 3-epoch controls serve both settings: 2 seeds x (2 calib + 1 control), less 2 kept
    # (calib seed 0 of each setting, as the fake keeps by name)
    assert sorted(t[0] for t in bench.trained) == [
        "calib_seed1", "calib_seed1", "control_3ep_b8_lr0.001_seed0",
        "control_3ep_b8_lr0.001_seed1"]
    assert {t[3] for t in bench.trained if t[0] == "calib_seed1"} == {"entropy", "percentile"}
    # a quantized run's recipe names its calibration (method, and percentile where it has
    # one); the shared control's does not
    assert {t[3] for t in bench.trained} == {"entropy", "percentile", None}
    assert [t[6].get("calib.percentile") for t in bench.trained if t[1] == "w4a8"
            and t[0] == "calib_seed1"] == [99.5]
    assert not any("calib.percentile" in t[6] for t in bench.trained if t[1] == "w8a8")
    assert all(t[4] == max(1, (os.cpu_count() or 1) // 2) for t in bench.trained)
    assert [r["report"] for r in runs["w4a8"]["calib"]] == [9.0, 1.0]
    assert runs["w8a8"]["control"] == runs["w4a8"]["control"]
    assert [r["dir"] for r in runs["w4a8"]["control"]] == ["control_3ep_b8_lr0.001_seed0",
                                                          "control_3ep_b8_lr0.001_seed1"]


def test_run_all_gives_each_learning_rate_its_own_control(tmp_path):
    bench = _FakeBench(tmp_path, kept={})
    run_all(bench, ["w8a8", "w4a8"], ["control"], [0], EPOCHS, BATCH,
            {**LR, "w4a8": 0.004}, SCENES, {"w8a8": ENTROPY, "w4a8": ENTROPY}, jobs=1)
    assert sorted((t[0], t[5]) for t in bench.trained) == [
        ("control_3ep_b8_lr0.001_seed0", 0.001), ("control_3ep_b8_lr0.004_seed0", 0.004)]


def test_run_all_checks_every_kept_run_before_training_any(tmp_path):
    bench = _FakeBench(tmp_path, kept={}, wrong="direct_seed1")
    with pytest.raises(InputError, match="direct_seed1"):
        run_all(bench, ["w4a4"], ["direct"], [0, 1], EPOCHS, BATCH, LR, SCENES,
                {"w4a4": ENTROPY}, jobs=2)
    assert bench.trained == []


def test_run_all_starts_with_the_longest_trainings(tmp_path):
    bench = _FakeBench(tmp_path, kept={})
    run_all(bench, ["w8a8", "w4a4"], ["direct"], [0], EPOCHS, BATCH, LR, SCENES,
            {"w8a8": ENTROPY, "w4a4": ENTROPY}, jobs=1)
    assert [(t[1], t[2]) for t in bench.trained] == [("w4a4", 10), ("w8a8", 3)]


def test_each_mode_takes_its_own_ranges_recipe_at_w4a4(tmp_path):
    recipes = mode_recipes({**EPOCHS, "w4a4": 10}, [])
    scenes = {"user.crop_size": [128, 256]}   # every W4A4 run trains on whole scenes
    assert recipes == {"w8a8": {}, "w4a8": {}, "w4a4": {
        "calib": scenes, "control": scenes,
        "stats": {**scenes, "qat.freeze_ranges_epochs": 8, "qat.range_momentum": 0.975},
        "direct": {**scenes, "qat.freeze_ranges_epochs": 5, "qat.range_lr_scale": 30,
                   "qat.track_weight_ranges": True}}}
    # never frozen for more epochs than the run has; a --set of a key serves every run
    short = mode_recipes({**EPOCHS, "w4a4": 4}, [])["w4a4"]
    assert short["stats"]["qat.freeze_ranges_epochs"] == short["direct"][
        "qat.freeze_ranges_epochs"] == 4
    assert mode_recipes(EPOCHS, ["qat.freeze_ranges_epochs=2", "user.crop_size=[64,64]"])[
        "w4a4"] == {"stats": {"qat.range_momentum": 0.975},
                    "direct": {"qat.range_lr_scale": 30, "qat.track_weight_ranges": True}}
    bench = _FakeBench(tmp_path, kept={})
    run_all(bench, ["w8a8", "w4a4"], ["calib", "stats", "direct", "control"], [0], EPOCHS,
            BATCH, LR, SCENES, {"w8a8": ENTROPY, "w4a4": ENTROPY}, jobs=1, recipes=recipes)
    ranges = {(t[1], t[0].partition("_")[0]): (t[6].get("qat.freeze_ranges_epochs"),
                                                t[6].get("qat.range_momentum"))
              for t in bench.trained}
    # the W4A4 control trains on whole scenes too, in a directory of its own
    assert sorted(t[0] for t in bench.trained if t[0].startswith("control")) == [
        "control_10ep_b2_lr0.008_crop128x256_seed0", "control_3ep_b8_lr0.001_seed0"]
    assert {t[1]: t[6].get("user.crop_size") for t in bench.trained
            if t[0].startswith("control")} == {"w4a4": [128, 256], "w8a8": None}
    assert ranges == {("w4a4", "stats"): (8, 0.975), ("w4a4", "direct"): (5, None),
                      ("w4a4", "calib"): (None, None), ("w4a4", "control"): (None, None),
                      ("w8a8", "stats"): (None, None), ("w8a8", "calib"): (None, None),
                      ("w8a8", "direct"): (None, None), ("w8a8", "control"): (None, None)}
    # W4A4 trains on all 320 scenes, its control too; 8-bit activations on half of them
    assert {(t[1], t[0].partition("_")[0]): t[6]["user.train_images"] for t in bench.trained} == {
        (setting, run): 320 if setting == "w4a4" else 160 for setting in ("w8a8", "w4a4")
        for run in ("calib", "stats", "direct", "control")}


def test_the_control_trains_on_qat_data_not_the_float_recipe_final_phase(tmp_path):
    """A float recipe whose frozen phase has a loader of its own (``train.final_phase_user``)
    must not hand it to the control: the control trains as QAT does, on QAT's data."""
    sets = ["train.final_phase_user.crop_size=[128,256]", "train.precise_bn=true"]
    cfg = load_config(ROOT / "config.yaml", sets)
    bench = SimpleNamespace(session=SimpleNamespace(cfg=cfg), file_qat=cfg.qat, overrides=sets,
                            weights=tmp_path / "float.pt")
    recipe = {"qat.epochs": 3, "qat.lr": 1e-3, "user.batch_size": 8}
    control = load_config(ROOT / "config.yaml", Bench.run_sets(
        bench, tmp_path / "control", "w8a8", "control", 0, recipe))
    assert control.train.final_phase_user == {} and not control.train.precise_bn
    assert control.train.epochs == 3 and control.train.freeze_bn_epochs == 3
    assert control.user["crop_size"] == cfg.user["crop_size"] == [128, 128]


class _ChainBench:
    """The chain's view of Bench: the real directory names and run settings, trainings
    recorded (each link's report: the start's report plus a gain that halves per link)."""

    run_dir = Bench.run_dir
    run_sets = Bench.run_sets

    def __init__(self, root: Path, kept: dict[tuple[str, str], dict]) -> None:
        cfg = load_config(ROOT / "config.yaml")
        self.out, self._kept, self.trained = root, kept, []
        self.session, self.file_qat, self.overrides = SimpleNamespace(cfg=cfg), cfg.qat, []
        self.weights = root / "float.pt"
        self.reports = {}
        self._lock = threading.Lock()

    def kept(self, out, setting, run, seed, recipe):
        return self._kept.get((out.parent.name, out.name))

    def train(self, out, setting, run, seed, recipe, threads):
        sets = self.run_sets(out, setting, run, seed, recipe)
        model_path = load_config(ROOT / "config.yaml", sets).model_path
        link = int(out.parent.name.rpartition("link")[2])
        start = self.reports[Path(model_path).parent]
        with self._lock:
            self.trained.append((out.parent.name, out.name, model_path, threads))
            self.reports[out] = start + 2.0 ** (1 - link)
        return {"run": run, "seed": seed, "report": self.reports[out]}


def test_the_w4a4_control_chain_starts_each_link_from_the_one_before(tmp_path):
    from bench.float_plateau import chain, chain_summary, link_dir, plateau

    bench = _ChainBench(tmp_path, kept={})
    recipe = {"qat.epochs": 10, "qat.lr": 0.008, "user.train_images": 320,
              "user.batch_size": 2, "user.crop_size": [128, 256]}
    first = []
    for seed, report in ((0, 76.0), (1, 77.0)):   # link 1: the benchmark's own controls
        bench.reports[link_dir(bench, 1, seed, recipe)] = report
        first.append({"report": report})
    # link 2 of seed 1 is kept from an earlier run: not trained again, its figure is used
    kept = link_dir(bench, 2, 1, recipe)
    bench._kept[(kept.parent.name, kept.name)] = {"report": 77.5}
    bench.reports[kept] = 77.5
    links = chain(bench, first, [0, 1], links=3, jobs=2)
    name = "control_10ep_b2_lr0.008_crop128x256_seed{}"
    assert sorted(t[:3] for t in bench.trained) == [
        ("w4a4_control_link2", name.format(0), str(tmp_path / name.format(0) / "last.pt")),
        ("w4a4_control_link3", name.format(0),
         str(tmp_path / "w4a4_control_link2" / name.format(0) / "last.pt")),
        ("w4a4_control_link3", name.format(1),
         str(tmp_path / "w4a4_control_link2" / name.format(1) / "last.pt"))]
    assert {t[3] for t in bench.trained} == {max(1, (os.cpu_count() or 1) // 2)}
    assert [[r["report"] for r in link] for link in links] == [[76.0, 77.0], [76.5, 77.5],
                                                              [76.75, 77.75]]
    rows = chain_summary(75.0, links)
    assert [r["link"] for r in rows] == [1, 2, 3]
    assert [r["gain_over_previous"] for r in rows] == pytest.approx([1.5, 0.5, 0.25])
    assert [r["met"] for r in rows] == [False, False, True]
    assert rows[0]["std"] == pytest.approx(0.5 ** 0.5)
    # link 3 gains at most 0.3 over link 2: link 2 is the plateau, seed 0's weights its model
    assert plateau(bench, rows, "float.pt", 0) == {
        "link": 2, "seed": 0,
        "model": str(tmp_path / "w4a4_control_link2" / name.format(0) / "last.pt")}
    assert plateau(bench, rows[:2], "float.pt", 0) is None
    rows[0]["met"] = True   # a float model the first control gains nothing over is its own
    assert plateau(bench, rows, "float.pt", 1)["model"] == "float.pt"


def test_make_bench_starts_every_benchmark_from_the_chains_plateau_model(tmp_path, monkeypatch):
    import json
    import subprocess

    import bench.__main__ as bench_main

    chain = tmp_path / "chain.json"
    commands = []

    def fake_run(cmd, cwd, check):
        commands.append(cmd)
        if "--links" in cmd:
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"w4a4_plateau": plateau}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    plateau = {"link": 7, "seed": 0, "model": "runs/bench_chain/link7/last.pt"}
    assert bench_main.plateau_model("runs/float/best.pt", 8, chain) == plateau["model"]
    assert commands[0][1:] == ["-m", "bench.float_plateau", "--weights", "runs/float/best.pt",
                               "--out-dir", "runs/bench_chain", "--seeds", "0", "1",
                               "--links", "8", "--json", str(chain)]
    # the whole command: every benchmark but the chain itself starts from the plateau model
    monkeypatch.setattr(bench_main, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_main, "ROOT", tmp_path)
    monkeypatch.setattr(bench_main, "collect", lambda: {})
    monkeypatch.setattr(bench_main, "markdown", lambda result: "")
    (tmp_path / "bench").mkdir()
    weights = tmp_path / "float.pt"
    weights.write_bytes(b"")
    commands.clear()
    monkeypatch.setattr("sys.argv", ["bench", "--weights", str(weights)])
    bench_main.main()
    assert commands[0][commands[0].index("--weights") + 1] == str(weights)
    started = {cmd[2]: cmd[cmd.index(flag) + 1] for cmd in commands[1:]
               for flag in ("--weights", "--float-weights") if flag in cmd}
    assert started == {name: plateau["model"] for name in (
        "bench.calib_speed", "bench.float_plateau", "bench.qat_modes", "bench.ptq_steps",
        "bench.sensitivity_cost", "bench.export_speed")}
    plateau = None   # every round still gains more than 0.3: no figure on a model short of it
    with pytest.raises(SystemExit, match="raise --plateau-links"):
        bench_main.plateau_model("runs/float/best.pt", 3, chain)
