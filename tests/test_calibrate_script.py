from __future__ import annotations

import json

import pytest

from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.train import main as train_main

from .helpers import tiny_config


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("float")
    cfg = tiny_config(tmp, train={"epochs": 2, "lr": 0.01, "log_interval": 0})
    assert train_main(["--mode", "float", "--config", str(cfg)]) == 0
    return tmp / "run" / "best.pt"


def test_calibrate_compares_all_methods(tmp_path, float_weights, capsys):
    cfg = tiny_config(tmp_path, model_path=str(float_weights),
                      calib={"num_batches": 1})
    assert calibrate_main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for method in ("float", "max", "percentile", "mse", "entropy"):
        assert method in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert set(rows) == {"max", "percentile", "mse", "entropy"}
    float_miou = results["float"]["miou"]
    for row in rows.values():
        assert row["drop"] == pytest.approx(float_miou - row["miou"])
        assert row["calib_seconds"] > 0
    assert results["best"] == max(r["miou"] for r in rows.values())
    ckpt = read_checkpoint(results["checkpoint"])
    assert ckpt["kind"] == "quantized" and ckpt["method"] == results["best_method"]


def test_fail_below_exits_3_and_still_writes_results(tmp_path, float_weights):
    cfg = tiny_config(tmp_path, model_path=str(float_weights),
                      calib={"num_batches": 1, "methods": ["max"]})
    assert calibrate_main(["--config", str(cfg), "--fail-below", "101"]) == 3
    assert (tmp_path / "run" / "results.json").exists()


def test_unknown_method_is_bad_input(tmp_path, float_weights, capsys):
    cfg = tiny_config(tmp_path, model_path=str(float_weights), calib={"methods": ["minmax"]})
    assert calibrate_main(["--config", str(cfg)]) == 2
    assert "minmax" in capsys.readouterr().err
