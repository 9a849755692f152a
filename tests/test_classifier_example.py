"""The second example, a torchvision ResNet-18 classifier behind the four hooks, through every
script: nothing in the toolkit may assume PIDNet."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.config import load_config
from pidnet.export_onnx import main as export_main
from pidnet.hooks import load_hooks
from pidnet.pipeline import Session, build_criterion, evaluate_model
from pidnet.sensitivity_analysis import main as sensitivity_main
from pidnet.train import main as train_main

from .helpers import ROOT

USER = {"arch": "resnet18", "image_size": 32, "batch_size": 32, "train_images": 512,
        "val_images": 128, "calib_images": 64}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    cfg = yaml.safe_load((ROOT / "examples" / "classifier" / "config.yaml").read_text())
    cfg.update(hooks=str(ROOT / "examples" / "classifier" / "hooks.py"), device="cpu",
               user=USER)
    cfg["train"].update(epochs=3, log_interval=0)
    cfg["qat"].update(epochs=1, freeze_bn_epochs=1, freeze_ranges_epochs=0, log_interval=0)
    cfg["calib"]["num_batches"] = 2
    cfg["export"].update(eval_batches=2, latency_runs=3)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main(["--mode", "float", "--config", str(path),
                       "--set", f"output_dir={tmp / 'float'}"]) == 0
    return tmp, path


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_classifier_goes_through_every_script(classifier):
    tmp, cfg = classifier
    weights = tmp / "float" / "best.pt"
    float_acc = _results(tmp / "float")["best"]
    assert float_acc > 60.0                       # four texture classes: chance is 25
    base = ["--config", str(cfg), "--set", f"model_path={weights}"]

    assert calibrate_main([*base, "--set", f"output_dir={tmp / 'ptq'}"]) == 0
    ptq = _results(tmp / "ptq")
    assert ptq["metric"] == "accuracy" and ptq["best"] > float_acc - 10

    for mode in ("calib", "stats", "direct"):
        assert train_main(["--mode", mode, *base, "--set", f"output_dir={tmp / mode}"]) == 0
        res = _results(tmp / mode)
        assert res["final"]["accuracy"] > 40.0, mode

    assert sensitivity_main(["--config", str(cfg), "--set",
                             f"model_path={tmp / 'ptq' / 'quantized.pt'}",
                             "--set", f"output_dir={tmp / 'sens'}"]) == 0
    sens = json.loads((tmp / "sens" / "sensitivity.json").read_text())
    names = [r["layer"] for r in sens["layers"]]
    assert names[0] == "conv1" and "fc" in names and len(names) > 20
    assert sens["meta"]["metric"] == "accuracy" and sens["meta"]["higher_is_better"]

    selected = tmp / "sens" / "sensitivity_model.pt"
    code = export_main(["--config", str(cfg), "--set", f"model_path={selected}",
                        "--set", f"output_dir={tmp / 'export'}"])
    export = _results(tmp / "export")
    assert code in (0, 3) and export["agreement"] >= 0.95
    assert export["optimized_int8_graph"]["integer_convs"] > 0
    assert abs(export["metrics"]["onnxruntime_int8"]
               - export["metrics"]["pytorch_fake_quant"]) <= 3.0


def test_classifier_float_training_keeps_a_weight_average(classifier):
    """``train.ema_decay`` for a model that is not PIDNet: the saved model is the average (its
    accuracy is the one reported), the live weights ride along in last.pt."""
    tmp, cfg = classifier
    out = tmp / "float_ema"
    assert train_main(["--mode", "float", "--config", str(cfg), "--set", "train.epochs=1",
                       "--set", "train.ema_decay=0.9", "--set", f"output_dir={out}"]) == 0
    last = read_checkpoint(out / "last.pt")
    assert last["ema_steps"] == 512 // 32
    assert not torch.equal(last["model"]["fc.weight"], last["live"]["fc.weight"])
    session = Session(load_config(str(cfg)), out, load_hooks(str(
        ROOT / "examples" / "classifier" / "hooks.py")), torch.device("cpu"))
    model = session.hooks.get_model(session.cfg)
    model.load_state_dict(last["model"])
    val = session.hooks.get_data_loader(session.cfg, "val")
    reported = _results(out)["epochs"][0]["accuracy"]
    assert evaluate_model(session, model, val, build_criterion(session))["accuracy"] == (
        pytest.approx(reported))


def test_classifier_post_training_steps(classifier):
    """Equalization, bias correction and AdaRound on torchvision's ResNet-18: a row each
    beside the range methods, every one a working classifier, the best one QAT's start."""
    tmp, cfg = classifier
    weights = tmp / "float" / "best.pt"
    float_acc = _results(tmp / "float")["best"]
    assert calibrate_main(["--config", str(cfg), "--set", f"model_path={weights}",
                           "--set", "calib.methods=[max]", "--set", "quant.weight_bits=4",
                           "--set", "calib.steps=[equalize,bias_correction,adaround]",
                           "--set", "calib.adaround_iterations=30", "--set", "calib.step_batches=1",
                           "--set", f"output_dir={tmp / 'steps'}"]) == 0
    ptq = _results(tmp / "steps")
    rows = {r["method"]: r for r in ptq["methods"]}
    assert list(rows) == ["max", "max + equalize", "max + bias correction", "max + AdaRound",
                          "max + equalize + bias correction + AdaRound"]
    assert all(r["accuracy"] > float_acc - 25 for r in rows.values()), rows
    # 20 convolutions and the classifier, each with its error before and after
    layers = rows["max + AdaRound"]["steps"]["adaround"]["layers"]
    assert len(layers) == 21 and all(v["adaround"] <= v["nearest"] for v in layers.values())
    best = ptq["best_config"]
    sets = [a for k, v in best.items() for a in ("--set", f"{k}={str(v).lower()}")]
    assert train_main(["--mode", "calib", "--config", str(cfg), "--set", f"model_path={weights}",
                       "--set", "quant.weight_bits=4", "--set", "calib.adaround_iterations=30",
                       "--set", "calib.step_batches=1", *sets,
                       "--set", f"output_dir={tmp / 'steps_qat'}"]) == 0
    start = _results(tmp / "steps_qat")["baselines"]["ptq"]["accuracy"]
    assert start == pytest.approx(ptq["best"], abs=1e-6)


def test_classifier_final_phase_trains_on_its_own_loader(classifier):
    """``train.final_phase_user`` for a model that is not PIDNet: the frozen last epoch draws
    from a loader built with those user keys (batches of 64 here, 32 before), and the schedule
    spans the steps of both, so it ends at zero."""
    tmp, cfg = classifier
    out = tmp / "float_final"
    assert train_main(["--mode", "float", "--config", str(cfg), "--set", "train.epochs=2",
                       "--set", "train.freeze_bn_epochs=1",
                       "--set", "train.final_phase_user.batch_size=64",
                       "--set", f"output_dir={out}"]) == 0
    last = read_checkpoint(out / "last.pt")
    assert last["scheduler"]["last_epoch"] == 512 // 32 + 512 // 64
    lrs = [e["lr"] for e in _results(out)["epochs"]]
    assert lrs[0] > 0 and lrs[-1] == pytest.approx(0.0, abs=1e-9)
