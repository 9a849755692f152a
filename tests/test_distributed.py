"""torchrun with two CPU processes (gloo) matches one process."""
from __future__ import annotations

import json

import pytest

from .helpers import TINY_HOOKS, TINY_NET_USER, run_script, run_torchrun, tiny_config


def test_two_processes_match_one(tmp_path, tiny_float_weights):
    # lr 1e-12 (learning rates must be above 0) and frozen batch norm: only calibration
    # (statistics merged across ranks) and the evaluation (confusion matrices summed across
    # ranks) differ between the two runs
    qat = {"epochs": 1, "lr": 1e-12, "log_interval": 0, "freeze_bn_epochs": 1}
    runs = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        runs[name] = tiny_config(tmp_path / name, hooks=TINY_HOOKS, user=TINY_NET_USER, qat=qat,
                                 model_path=str(tiny_float_weights), calib={"num_batches": 2})
    assert run_script("qat_train.py", "--mode", "calib", "--config",
                      str(runs["one"])).returncode == 0
    two = run_torchrun("qat_train.py", "--mode", "calib", "--config", str(runs["two"]))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("results.json") == 1           # only rank 0 writes and prints
    one_res = json.loads((tmp_path / "one" / "run" / "results.json").read_text())
    two_res = json.loads((tmp_path / "two" / "run" / "results.json").read_text())
    assert two_res["baselines"]["float"]["miou"] == pytest.approx(
        one_res["baselines"]["float"]["miou"], abs=1e-6)
    assert two_res["baselines"]["ptq"]["miou"] == pytest.approx(
        one_res["baselines"]["ptq"]["miou"], abs=0.5)
    assert two_res["best"] == pytest.approx(one_res["best"], abs=0.5)


