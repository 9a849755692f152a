"""A model the toolkit never saw, as a new user brings it: torchvision's LRASPP with dict
outputs, a loader of dict batches and a criterion returning a dict of losses, through every
script with nothing but config keys."""
from __future__ import annotations

import json

import pytest
import torch

from pidnet.batches import main_prediction, split_batch, total_loss
from pidnet.calibrate import main as calibrate_main
from pidnet.errors import InputError
from pidnet.export_onnx import main as export_main
from pidnet.sensitivity_analysis import main as sensitivity_main
from pidnet.train import main as train_main

from .helpers import ROOT, tiny_config

LRASPP_HOOKS = str(ROOT / "examples" / "segmentation" / "hooks.py")


def _config(tmp_path, **extra):
    return tiny_config(tmp_path, hooks=LRASPP_HOOKS, user={},
                       batch={"inputs": "image", "targets": "mask"},
                       calib={"num_batches": 1, "methods": ["max", "entropy"]},
                       qat={"epochs": 1, "lr": 0.001, "log_interval": 1,
                            "freeze_ranges_epochs": 0},
                       sensitivity={"num_batches": 1, "tolerance": 1e9},
                       export={"eval_batches": 1, "latency_runs": 3}, **extra)


def test_torchvision_lraspp_goes_through_every_script(tmp_path, capsys):
    cfg = str(_config(tmp_path))
    out = {stage: tmp_path / stage for stage in ("cal", "qat", "sens", "export")}
    assert calibrate_main(["--config", cfg, "--set", f"output_dir={out['cal']}"]) == 0
    ptq = json.loads((out["cal"] / "results.json").read_text())
    assert ptq["metric"] == "loss" and {m["method"] for m in ptq["methods"]} == {"max",
                                                                                 "entropy"}
    assert all(m["loss"] > 0 for m in ptq["methods"])

    assert train_main(["--mode", "calib", "--config", cfg,
                       "--set", f"output_dir={out['qat']}"]) == 0
    log = capsys.readouterr().err
    assert "cross_entropy" in log and "dice" in log          # each part of the loss logged
    qat = json.loads((out["qat"] / "results.json").read_text())
    assert qat["final"]["loss"] > 0

    assert sensitivity_main(["--config", cfg, "--set", f"model_path={out['qat'] / 'best.pt'}",
                             "--set", f"output_dir={out['sens']}"]) == 0
    sens = json.loads((out["sens"] / "sensitivity.json").read_text())
    assert len(sens["layers"]) > 40 and sens["baseline"]["quantized"] > 0

    assert export_main(["--config", cfg, "--set", f"model_path={out['cal'] / 'quantized.pt'}",
                        "--set", f"output_dir={out['export']}"]) == 0
    export = json.loads((out["export"] / "results.json").read_text())
    assert export["metric"] == "loss" and export["metric_drop"] <= 0.3
    # every quantized tensor compared. With random weights the squeeze-excite branches are
    # where onnxruntime's integer kernels and PyTorch part: their 1x1 convolutions read a
    # vector of 24-120 channel means, and a one-step rounding difference of the integer average
    # pool and product upstream grows to 2-4 steps on a few of those elements; the metric does
    # not move (above). The check names the first such tensor, in a squeeze-excite branch.
    check = export["layer_check"]
    assert check["tensors"] > 60
    if check["first_divergence"] is not None:
        assert ".block.2." in check["first_divergence"]["quantizer"]


def test_dict_batches_need_their_keys_and_say_so(tmp_path, capsys):
    cfg = str(_config(tmp_path))
    assert calibrate_main(["--config", cfg, "--set", "batch.inputs=null"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: get_data_loader yields a dict with keys 'image', 'mask'")
    assert "'batch.inputs'" in line


def test_what_a_model_returns_and_what_a_criterion_returns():
    logits = torch.zeros(1, 2, 4, 4)
    assert main_prediction({"out": logits, "aux": logits + 1}) is logits
    assert main_prediction({"logits": logits}) is logits
    assert main_prediction([logits]) is logits
    assert main_prediction((logits, logits + 1), 1)[0, 0, 0, 0] == 1
    with pytest.raises(ValueError, match="a tuple of 3: which is the prediction is ambiguous"):
        main_prediction((logits, logits, logits))
    with pytest.raises(ValueError, match="has no 'main'"):
        main_prediction({"out": logits}, "main")
    total, parts = total_loss({"a": torch.tensor(1.0), "b": torch.tensor([2.0])})
    assert float(total) == 3.0 and list(parts) == ["a", "b"]
    with pytest.raises(InputError, match="get_criterion's loss returned a list of 2"):
        total_loss([torch.tensor(1.0), torch.tensor(2.0)])
    assert split_batch({"x": 1, "y": 2}, "x", "y") == (1, 2)
    with pytest.raises(InputError, match="without 'mask'"):
        split_batch({"image": 1}, "image", "mask")
