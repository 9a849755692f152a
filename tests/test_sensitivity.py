"""sensitivity_analysis.py on a model with one fragile layer, through the original README's
hooks and config form, and on checkpoints from calibrate.py."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from pidnet.config import load_config
from pidnet.hooks import load_hooks
from pidnet.pipeline import Session, build_criterion, evaluate_model, load_quantized
from pidnet.sensitivity_analysis import main

from .helpers import (ROOT, TINY_HOOKS, TINY_NET_USER, failure, run_script, run_torchrun,
                      tiny_config)

FRAGILE_HOOKS = str(ROOT / "tests" / "fixtures" / "fragile_hooks.py")
LAYERS = ["expand", "fragile", "head"]


def legacy_config(tmp_path, **extra):
    """The original README's form: flat model_path, data_path, output_file, tolerance; hooks
    that load model_path themselves."""
    from tests.fixtures.fragile_hooks import FragileNet

    weights = tmp_path / "my_weights.pth"
    torch.save(FragileNet().state_dict(), weights)
    cfg = {"hooks": FRAGILE_HOOKS, "model_path": str(weights), "data_path": str(tmp_path),
           "output_file": "kept_float.pt", "tolerance": 0.01,
           "output_dir": str(tmp_path / "run"), "device": "cpu", **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _reports(run):
    return (json.loads((run / "sensitivity.json").read_text()),
            json.loads((run / "results.json").read_text()))


@pytest.mark.parametrize("direction", ["disable_one", "enable_one"])
def test_fragile_layer_is_found_and_kept_float(tmp_path, direction, capsys):
    cfg = legacy_config(tmp_path)
    assert main(["--config", str(cfg), "--set", f"sensitivity.direction={direction}"]) == 0
    run = tmp_path / "run"
    report, results = _reports(run)
    assert [r["layer"] for r in report["layers"]] == LAYERS          # execution order
    ranked = sorted(report["layers"], key=lambda r: r["sensitivity_rank"])
    assert ranked[0]["layer"] == "fragile"
    assert report["float_layers"] == ["fragile"] == results["float_layers"]
    base = report["baseline"]
    assert base["float"] == pytest.approx(0.0, abs=1e-9)            # loss: lower is better
    assert base["quantized"] > 0.1
    assert not report["meta"]["higher_is_better"]
    for row in report["layers"]:
        assert row["delta"] == pytest.approx(row["metric"] - base["quantized"])
    selected = report["selection"]["steps"][-1]["metric"]
    assert report["selection"]["met"] and selected <= base["float"] + 0.01
    assert '--set \'quant.exclude=["fragile"]\'' in capsys.readouterr().out
    assert results["exclude_override"] == '--set \'quant.exclude=["fragile"]\''

    # CSV rows agree with the JSON; the plot exists
    with open(run / "sensitivity.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["layer"] for r in csv_rows] == LAYERS
    for c, j in zip(csv_rows, report["layers"]):
        assert float(c["metric"]) == pytest.approx(j["metric"])
    assert (run / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run.glob("sensitivity.rows*"))

    # the saved model reloads with fragile float and scores the selection's metric
    config = load_config(cfg)
    session = Session(config, run, load_hooks(config.hooks), torch.device("cpu"))
    model = load_quantized(session, run / "kept_float.pt")
    assert not model.fragile.input_quantizer.is_enabled
    assert model.expand.input_quantizer.is_enabled and model.head.input_quantizer.is_enabled
    loader = session.hooks.get_data_loader(config, "val")
    again = evaluate_model(session, model, loader, build_criterion(session))["loss"]
    assert again == pytest.approx(selected, rel=1e-6)


def test_unreachable_tolerance_exits_3_and_saves_no_model(tmp_path):
    cfg = legacy_config(tmp_path, tolerance=0.0)
    assert main(["--config", str(cfg)]) == 3
    report, results = _reports(tmp_path / "run")
    assert not report["selection"]["met"] and results["checkpoint"] is None
    assert len(report["selection"]["steps"]) == len(LAYERS)   # at most L-1 layers returned
    assert not (tmp_path / "run" / "kept_float.pt").exists()


def test_sweep_killed_mid_way_resumes_without_redoing_layers(tmp_path):
    cfg = legacy_config(tmp_path)
    (tmp_path / "ref").mkdir()
    ref = legacy_config(tmp_path / "ref")
    assert main(["--config", str(ref)]) == 0
    # 6 batches per evaluation: 2 baselines, the first layer, then killed inside the second
    env = {**os.environ, "FRAGILE_KILL_AFTER": str(6 * 3 + 3)}
    killed = run_script("sensitivity_analysis.py", "--config", str(cfg), env=env)
    assert killed.returncode == -9
    rows = list((tmp_path / "run").glob("sensitivity.rows.rank*.jsonl"))
    assert [json.loads(line)["layer"] for line in rows[0].read_text().splitlines()] == ["expand"]
    with open(rows[0], "a") as f:
        f.write('{"layer": "frag')                  # a torn line, as a kill mid-write leaves
    resumed = run_script("sensitivity_analysis.py", "--config", str(cfg))
    assert resumed.returncode == 0, resumed.stderr
    assert "1 already measured" in resumed.stderr
    assert "layer expand:" not in resumed.stderr and "layer fragile:" in resumed.stderr
    got, want = _reports(tmp_path / "run")[0], _reports(tmp_path / "ref" / "run")[0]
    assert [r["metric"] for r in got["layers"]] == pytest.approx(
        [r["metric"] for r in want["layers"]])
    assert got["float_layers"] == want["float_layers"] == ["fragile"]


def test_finished_sweep_is_not_overwritten(tmp_path, capsys):
    cfg = legacy_config(tmp_path)
    assert main(["--config", str(cfg)]) == 0
    before = (tmp_path / "run" / "results.json").read_text()
    assert main(["--config", str(cfg), "--set", "tolerance=0.5"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_two_ranks_share_the_layers_and_agree_with_one(tmp_path):
    cfg = legacy_config(tmp_path)
    two = run_torchrun("sensitivity_analysis.py", "--config", str(cfg))
    assert two.returncode == 0, failure(two)
    assert two.stdout.count("results.json") == 1
    # each rank measured its own share of the layers
    measured = [line for line in two.stderr.splitlines() if "INFO" in line and " layer " in line]
    assert len(measured) == len(LAYERS)
    report = _reports(tmp_path / "run")[0]
    assert report["meta"]["ranks"] == 2 and report["float_layers"] == ["fragile"]
    (tmp_path / "one").mkdir()
    one_cfg = legacy_config(tmp_path / "one")
    assert main(["--config", str(one_cfg)]) == 0
    one = _reports(tmp_path / "one" / "run")[0]
    assert [r["metric"] for r in report["layers"]] == pytest.approx(
        [r["metric"] for r in one["layers"]])


def test_quantized_and_float_checkpoints(tmp_path, tiny_float_weights):
    """model_path a float checkpoint (calibrated here) or calibrate.py's quantized one."""
    from pidnet.calibrate import main as calibrate_main

    common = {"hooks": TINY_HOOKS, "user": TINY_NET_USER, "calib": {"num_batches": 1},
              "sensitivity": {"num_batches": 1, "tolerance": 100.0}}
    (tmp_path / "f").mkdir()
    cfg = tiny_config(tmp_path / "f", model_path=str(tiny_float_weights), **common)
    assert main(["--config", str(cfg)]) == 0
    report = _reports(tmp_path / "f" / "run")[0]
    assert report["meta"]["model_source"].startswith("float weights")
    assert report["meta"]["batches"] == 1
    assert report["float_layers"] == []                        # 100 points: INT8 as it is
    layers = [r["layer"] for r in report["layers"]]
    assert layers[0] == "stem.0.0" and layers[-1] == "head"

    (tmp_path / "c").mkdir()
    cal = tiny_config(tmp_path / "c", model_path=str(tiny_float_weights),
                      **{**common, "calib": {"num_batches": 1, "methods": ["max"]}})
    assert calibrate_main(["--config", str(cal)]) == 0
    (tmp_path / "q").mkdir()
    cfg = tiny_config(tmp_path / "q", model_path=str(tmp_path / "c" / "run" / "quantized.pt"),
                      **{**common, "sensitivity": {"tolerance": 100.0}})
    assert main(["--config", str(cfg)]) == 0
    report = _reports(tmp_path / "q" / "run")[0]
    assert report["meta"]["model_source"].startswith("quantized checkpoint")
    calibrated = json.loads((tmp_path / "c" / "run" / "results.json").read_text())
    assert [r["layer"] for r in report["layers"]] == layers
    # the ranges calibrate.py chose, kept: the whole val split scores as calibrate measured
    assert report["baseline"]["quantized"] == pytest.approx(calibrated["best"], abs=1e-6)
    assert report["meta"]["batches"] == "all of the val split"
    # a checkpoint placed for another target is refused before any work
    assert main(["--config", str(cfg), "--force", "--set", "export.target=onnxruntime"]) == 2


def test_untrained_example_model_is_refused_before_any_work(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["--config", str(cfg)]) == 2
    assert "model_path" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_qat_trains_a_model_the_hooks_return_with_model_path_null(tmp_path):
    from pidnet.train import main as train_main

    cfg = legacy_config(tmp_path, model_path=None, qat={"epochs": 1, "log_interval": 0},
                        calib={"num_batches": 2})
    assert train_main(["--mode", "calib", "--config", str(cfg)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["baselines"]["float"]["loss"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "run" / "best.pt").exists()


def test_two_ranks_resume_a_sweep_one_rank_left_unfinished(tmp_path):
    cfg = legacy_config(tmp_path)
    env = {**os.environ, "FRAGILE_KILL_AFTER": str(6 * 3 + 3)}   # killed inside layer two
    assert run_script("sensitivity_analysis.py", "--config", str(cfg), env=env).returncode == -9
    two = run_torchrun("sensitivity_analysis.py", "--config", str(cfg))
    assert two.returncode == 0, failure(two)
    measured = [line for line in two.stderr.splitlines() if "INFO" in line and " layer " in line]
    assert sorted(line.split(" layer ")[1].split(":")[0] for line in measured) == [
        "fragile", "head"]                       # expand was finished before the kill
    report = _reports(tmp_path / "run")[0]
    assert [r["layer"] for r in report["layers"]] == LAYERS
    assert report["float_layers"] == ["fragile"]


def test_reselect_takes_a_new_tolerance_from_the_rows_on_disk(tmp_path, capsys):
    cfg = legacy_config(tmp_path, tolerance=1e9)        # met with every layer quantized
    assert main(["--config", str(cfg)]) == 0
    first, _ = _reports(tmp_path / "run")
    assert first["float_layers"] == []
    capsys.readouterr()
    assert main(["--config", str(cfg), "--set", "tolerance=0.01"]) == 2   # says what to pass
    assert "--reselect" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--set", "tolerance=0.01", "--reselect"]) == 0
    log = capsys.readouterr().err
    assert "selecting again from the 3 layers measured" in log
    assert not [line for line in log.splitlines() if "layer expand:" in line]   # not measured
    second, results = _reports(tmp_path / "run")
    assert second["float_layers"] == ["fragile"] == results["float_layers"]
    assert [r["metric"] for r in second["layers"]] == [r["metric"] for r in first["layers"]]
    assert second["baseline"] == first["baseline"]
    # another model is not reselected from
    weights = tmp_path / "my_weights.pth"
    os.utime(weights, ns=(1, 1))
    assert main(["--config", str(cfg), "--reselect"]) == 2
    assert "another model or config" in capsys.readouterr().err


def test_a_qat_checkpoint_is_measured_against_the_float_model_it_came_from(tmp_path,
                                                                           tiny_float_weights):
    from pidnet.train import main as train_main

    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      model_path=str(tiny_float_weights), calib={"num_batches": 1},
                      qat={"epochs": 1, "lr": 0.05, "log_interval": 0},
                      sensitivity={"tolerance": 100.0})
    assert train_main(["--mode", "calib", "--config", str(cfg),
                       "--set", f"output_dir={tmp_path / 'qat'}"]) == 0
    float_miou = json.loads((tmp_path / "qat" / "results.json").read_text())[
        "baselines"]["float"]["miou"]
    qat_ckpt = tmp_path / "qat" / "best.pt"
    for name, extra in (("recorded", []),
                        ("given", ["--set", f"sensitivity.reference={tiny_float_weights}"])):
        assert main(["--config", str(cfg), "--set", f"model_path={qat_ckpt}",
                     "--set", f"output_dir={tmp_path / name}", *extra]) == 0
        report, _ = _reports(tmp_path / name)
        base = report["baseline"]
        # the float model on the same batches, not the QAT weights with quantizers off
        assert base["float"] == pytest.approx(float_miou, abs=1e-6)
        assert base["quantizers_off"] != pytest.approx(base["float"], abs=1e-3)
        assert base["reference"] == f"float weights {tiny_float_weights} (" + (
            "recorded in the checkpoint)" if name == "recorded" else "sensitivity.reference)")
