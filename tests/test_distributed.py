"""torchrun with two CPU processes (gloo) matches one process."""
from __future__ import annotations

import json

import pytest

from .helpers import (ROOT, TINY_HOOKS, TINY_NET_USER, failure, run_script, run_torchrun,
                      tiny_config)

RANK_HOOKS = str(ROOT / "tests" / "fixtures" / "rank_hooks.py")


def _records(folder, rank):
    """What rank_hooks wrote after each evaluation of that rank that had quantizers."""
    path = folder / f"rank{rank}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["ranges"]]


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
    qat = {"epochs": 1, "lr": 0.01, "log_interval": 0, "direct_init": "lsq",
           "freeze_ranges_epochs": 0}
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER, qat=qat,
                      model_path=str(tiny_float_weights), calib={"num_batches": 1})
    two = run_torchrun("qat_train.py", "--mode", "direct", "--config", str(cfg))
    assert two.returncode == 0, failure(two)
    state = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    amax = [v for k, v in state.items() if k.endswith("input_quantizer._amax")]
    assert amax and all(bool((a > 0).all() and a.isfinite().all()) for a in amax)
    assert not any(float(a.reshape(-1)[0]) == 4.0 for a in amax)   # not the fixed start


@pytest.mark.parametrize("mode", ["calib", "stats", "direct"])
def test_two_ranks_train_the_model_one_process_trains(tmp_path, tiny_float_weights, mode,
                                                      monkeypatch):
    """A real learning rate, ranges tracked (stats) or learned (direct) in epoch 1 and frozen
    in epoch 2: at every evaluation both ranks hold the same ranges, frozen ones stay where
    they froze, and the final metric is one process's within the tolerance below."""
    qat = {"epochs": 2, "lr": 0.01, "log_interval": 0, "freeze_ranges_epochs": 1,
           "range_momentum": 0.5, "stats_recalibrate": "never", "freeze_bn_epochs": 2}
    results, records = {}, {}
    for name, batch in (("one", 4), ("two", 2)):      # 4 images a step either way
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setenv("PIDNET_TEST_RANGES", str(folder))
        cfg = tiny_config(folder, hooks=RANK_HOOKS, user={**TINY_NET_USER, "batch_size": batch},
                          qat=qat, model_path=str(tiny_float_weights), calib={"num_batches": 2})
        args = ["--mode", mode, "--config", str(cfg)]
        proc = run_script("qat_train.py", *args) if name == "one" else \
            run_torchrun("qat_train.py", *args)
        assert proc.returncode == 0, failure(proc)
        results[name] = json.loads((folder / "run" / "results.json").read_text())
        records[name] = [_records(folder, r) for r in range((name == "two") + 1)]
    rank0, rank1 = records["two"]
    assert len(rank0) == len(rank1) >= 3                   # start, epoch 1, epoch 2
    for a, b in zip(rank0, rank1):
        assert a["ranges"] == b["ranges"]
    for ranks in (records["one"][0], rank0, rank1):       # frozen for the last epoch
        assert ranks[-1]["ranges"] == ranks[-2]["ranges"]
    if mode != "calib":                                   # they did move before
        assert rank0[-2]["ranges"] != rank0[-3]["ranges"]
    # what differs is the order the sampler deals the images in and the merged calibration
    # histograms (batch norm is frozen). On this tiny model (8 val images, mIoU about 20) one
    # process's final mIoU spans 3.8 (calib), 1.6 (stats) and 2.0 (direct) over seeds 0-3 of
    # this recipe: two ranks must land within that spread of one process
    assert results["two"]["final"]["miou"] == pytest.approx(results["one"]["final"]["miou"],
                                                            abs=4.0)


def test_stats_tracks_the_data_of_every_rank(tmp_path, tiny_float_weights, monkeypatch):
    """Rank 1's training images are 3x rank 0's: the tracked range of the input follows the
    larger data on both ranks (the max over ranks), not rank 0's alone."""
    monkeypatch.setenv("PIDNET_TEST_RANGES", str(tmp_path))
    monkeypatch.setenv("PIDNET_TEST_RANK1_SCALE", "3")
    qat = {"epochs": 2, "lr": 0.01, "log_interval": 0, "freeze_ranges_epochs": 1,
           "range_momentum": 0.5, "stats_range": "max", "stats_recalibrate": "never"}
    cfg = tiny_config(tmp_path, hooks=RANK_HOOKS, user={**TINY_NET_USER, "batch_size": 2},
                      qat=qat, model_path=str(tiny_float_weights), calib={"num_batches": 2})
    two = run_torchrun("qat_train.py", "--mode", "stats", "--config", str(cfg))
    assert two.returncode == 0, failure(two)
    rank0, rank1 = _records(tmp_path, 0), _records(tmp_path, 1)
    key = "stem.0.0.input_quantizer._amax"
    start, tracked = rank0[-3]["ranges"][key][0], rank0[-2]["ranges"][key][0]
    assert rank1[-2]["ranges"][key][0] == tracked
    # 4 steps at momentum 0.5 towards 3x the start: 0.5^4 + 3 (1 - 0.5^4) = 2.9x
    assert tracked > 2.5 * start
