"""torchrun with two CPU processes (gloo) matches one process."""
from __future__ import annotations

import json

import pytest

from .helpers import TINY_HOOKS, TINY_NET_USER, failure, run_script, run_torchrun, tiny_config


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
    assert two.returncode == 0, failure(two)
    assert two.stdout.count("results.json") == 1           # only rank 0 writes and prints
    one_res = json.loads((tmp_path / "one" / "run" / "results.json").read_text())
    two_res = json.loads((tmp_path / "two" / "run" / "results.json").read_text())
    assert two_res["baselines"]["float"]["miou"] == pytest.approx(
        one_res["baselines"]["float"]["miou"], abs=1e-6)
    assert two_res["baselines"]["ptq"]["miou"] == pytest.approx(
        one_res["baselines"]["ptq"]["miou"], abs=0.5)
    assert two_res["best"] == pytest.approx(one_res["best"], abs=0.5)




def test_lsq_start_is_shared_by_every_rank(tmp_path, tiny_float_weights):
    """direct with LSQ's start under torchrun: each rank starts from its own first batch, rank
    0's steps are broadcast, and the run ends with positive, finite static ranges."""
    from pidnet.checkpoint import read_checkpoint
    qat = {"epochs": 1, "lr": 0.01, "log_interval": 0, "direct_init": "lsq"}
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER, qat=qat,
                      model_path=str(tiny_float_weights), calib={"num_batches": 1})
    two = run_torchrun("qat_train.py", "--mode", "direct", "--config", str(cfg))
    assert two.returncode == 0, failure(two)
    state = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    amax = [v for k, v in state.items() if k.endswith("input_quantizer._amax")]
    assert amax and all(bool((a > 0).all() and a.isfinite().all()) for a in amax)
    assert not any(float(a.reshape(-1)[0]) == 4.0 for a in amax)   # not the fixed start
