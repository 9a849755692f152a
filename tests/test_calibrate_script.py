from __future__ import annotations

import json

import pytest

import torch

from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.config import load_config
from pidnet.errors import CheckpointError
from pidnet.hooks import load_hooks
from pidnet.pipeline import (Session, build_criterion, evaluate_model, load_quantized,
                             quantized_model)
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
                      calib={"num_batches": 1, "percentiles": [90.0, 99.99]})
    assert calibrate_main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for method in ("float", "max", "percentile 90", "percentile 99.99", "mse", "entropy"):
        assert method in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert set(rows) == {"max", "percentile 90", "percentile 99.99", "mse", "entropy"}
    assert rows["percentile 90"]["config"] == {"calib.method": "percentile",
                                               "calib.percentile": 90.0}
    assert rows["entropy"]["config"] == {"calib.method": "entropy"}
    assert rows["percentile 90"]["miou"] != rows["percentile 99.99"]["miou"]
    float_miou = results["float"]["miou"]
    for row in rows.values():
        assert row["drop"] == pytest.approx(float_miou - row["miou"])
        assert row["calib_seconds"] > 0
    assert results["best"] == max(r["miou"] for r in rows.values())
    ckpt = read_checkpoint(results["checkpoint"])
    assert ckpt["kind"] == "quantized" and ckpt["method"] == results["best_method"]

    # the saved model reloads (as every later script loads it) and scores the same
    config = load_config(cfg)
    session = Session(config, tmp_path, load_hooks(config.hooks), torch.device("cpu"))
    model = load_quantized(session, results["checkpoint"])
    metrics = evaluate_model(session, model, session.hooks.get_data_loader(config, "val"),
                             build_criterion(session))
    assert metrics["miou"] == pytest.approx(results["best"], abs=1e-6)
    # the config keys it names calibrate the float model to the same ranges (QAT calib's start)
    config = load_config(cfg, [f"{k}={v}" for k, v in results["best_config"].items()])
    session = Session(config, tmp_path, load_hooks(config.hooks), torch.device("cpu"))
    again, _origin = quantized_model(session)
    assert evaluate_model(session, again, session.hooks.get_data_loader(config, "val"),
                          build_criterion(session))["miou"] == pytest.approx(results["best"],
                                                                             abs=1e-6)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(session, float_weights)


def test_fail_below_exits_3_and_still_writes_results(tmp_path, float_weights):
    cfg = tiny_config(tmp_path, model_path=str(float_weights),
                      calib={"num_batches": 1, "methods": ["max"]})
    assert calibrate_main(["--config", str(cfg), "--fail-below", "101"]) == 3
    assert (tmp_path / "run" / "results.json").exists()


def test_unknown_method_is_bad_input(tmp_path, float_weights, capsys):
    cfg = tiny_config(tmp_path, model_path=str(float_weights), calib={"methods": ["minmax"]})
    assert calibrate_main(["--config", str(cfg)]) == 2
    assert "minmax" in capsys.readouterr().err
