"""Post-training steps beyond ranges: cross-layer equalization, AdaRound, bias correction."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from pidnet import quant
from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.config import QuantConfig, load_config
from pidnet.export_onnx import main as export_main
from pidnet.hooks import load_hooks
from pidnet.model import create_model
from pidnet.pipeline import (Session, build_criterion, evaluate_model, load_quantized,
                             quantized_model, save_quantized)
from pidnet.train import main as train_main

from .helpers import TINY_HOOKS, TINY_NET_USER, tiny_config


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _with_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch norms with statistics of their own (not the initial 0 and 1), so folding them
    moves every weight."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def _channel_ranges(first: nn.Module, second: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    out_ranges = first.weight.detach().reshape(first.weight.shape[0], -1).abs().amax(1)
    in_ranges = second.weight.detach().transpose(0, 1).reshape(
        second.weight.shape[1], -1).abs().amax(1)
    return out_ranges, in_ranges


def test_equalization_keeps_pidnet_outputs_and_equalizes_every_pair():
    torch.manual_seed(0)
    model = _with_running_stats(create_model("pidnet_s", num_classes=4), torch.randn(4, 3, 64,
                                                                                      128))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        want = model(x)
    equalized = copy.deepcopy(model)
    counts = quant.equalize(equalized, x)
    with torch.no_grad():
        got = equalized(x)
    # every batch norm after a convolution folded; pairs joined by the top-level ReLU, which
    # PIDNet calls in several places, are found at each call site
    assert counts["folded"] == 68 and counts["pairs"] >= 25
    assert all(_relative(g, w) < 1e-5 for g, w in zip(got, want))
    assert len(quant.folded_layers(equalized)) == 68
    # layer1.0's two convolutions: channel i's range is the same in both after equalizing
    first, second = equalized.layer1[0].conv1, equalized.layer1[0].conv2
    out_ranges, in_ranges = _channel_ranges(first, second)
    assert torch.allclose(out_ranges, in_ranges, rtol=1e-4)
    before_out, before_in = _channel_ranges(model.layer1[0].conv1, model.layer1[0].conv2)
    assert not torch.allclose(before_out * model.layer1[0].bn1.weight.abs()
                              / torch.sqrt(model.layer1[0].bn1.running_var + 1e-5), before_in,
                              rtol=1e-2)


def test_equalization_keeps_a_torchvision_classifier_in_double_precision():
    torch.manual_seed(0)
    model = _with_running_stats(torchvision.models.resnet18(num_classes=4).double(),
                                torch.randn(4, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    counts = quant.equalize(model, x)
    with torch.no_grad():
        got = model(x)
    assert counts["folded"] == 20 and counts["pairs"] == 8   # conv1 -> conv2 of every block
    assert _relative(got, want) < 1e-10
    assert _relative(got.float(), want.float()) < 1e-5


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)
                         ).eval()


def _quantized(net: nn.Module, x: torch.Tensor, **qcfg) -> nn.Module:
    model = quant.insert_quantizers(copy.deepcopy(net), QuantConfig(**qcfg), "tensorrt", x)
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")),
                       "max")
    return model


def _layer_errors(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> dict[int, float]:
    """Each weight layer's output error, measured as AdaRound's objective but on every output
    position: the layer's input from ``model`` (the quantized layers before it), its output
    with ``model``'s quantized weights against the float ``reference`` on float inputs."""
    errors = {}
    layers = [i for i, m in enumerate(model) if hasattr(m, "weight_quantizer")]
    with torch.no_grad():
        for i in layers:
            xq, xf = x, x
            for j in range(i):
                xq, xf = model[j](xq), reference[j](xf)
            errors[i] = float((model[i](xq) - reference[i](xf)).square().mean())
    return errors


def test_adaround_at_4_bits_beats_nearest_rounding_on_every_layer_on_the_grid():
    net = _small_net()
    x = torch.randn(16, 3, 8, 8)
    nearest = _quantized(net, x, weight_bits=4)
    learned = _quantized(net, x, weight_bits=4)
    report = quant.adaround(learned, [x[:8], x[8:]], x[:8],
                            quant.AdaRoundSettings(iterations=300, samples=1024, batch=256))
    assert list(report) == ["0", "2", "4", "7"]
    before, after = _layer_errors(nearest, net, x), _layer_errors(learned, net, x)
    assert all(after[i] <= before[i] for i in before), (before, after)
    assert sum(after[i] / before[i] for i in before) / len(before) < 0.9
    changed = 0
    for i in before:
        layer, q = learned[i], learned[i].weight_quantizer
        step = q.amax / 7
        w = layer.weight.detach()
        # on the grid, and the quantizer gives back exactly the weights written
        assert torch.allclose(w / step, torch.round(w / step), atol=1e-4)
        assert torch.equal(q(w), w)
        changed += int((torch.round(net[i].weight / step) * step - w).abs().gt(1e-6).sum())
    assert changed > 0          # some weights round the other way than to the nearest point


def test_bias_correction_brings_each_layers_mean_shift_closer_to_zero():
    net = _small_net()
    x = torch.randn(16, 3, 8, 8)
    model = _quantized(net, x, weight_bits=3, per_channel=False)

    def shifts(m: nn.Module) -> dict[int, torch.Tensor]:
        found = {}
        with torch.no_grad():
            xq, xf = x, x
            for i, (layer, ref) in enumerate(zip(m, net)):
                xq, xf = layer(xq), ref(xf)
                if hasattr(layer, "weight_quantizer"):
                    dims = [0] if xq.dim() == 2 else [0, 2, 3]
                    found[i] = (xq - xf).mean(dims)
        return found

    before = shifts(model)
    corrected = quant.correct_bias(model, [x[:8], x[8:]], x[:8])
    after = shifts(model)
    assert set(corrected) == {"0", "2", "4", "7"}
    for i in before:
        assert after[i].abs().mean() < 0.5 * before[i].abs().mean(), i


def test_bias_correction_goes_through_the_batch_norm_of_a_conv_without_bias():
    torch.manual_seed(0)
    net = _with_running_stats(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8),
                                            nn.ReLU(), nn.Conv2d(8, 4, 1)),
                              torch.randn(8, 3, 8, 8))
    x = torch.randn(8, 3, 8, 8)
    model = _quantized(net, x, weight_bits=3)
    mean_before = model[1].running_mean.clone()
    quant.correct_bias(model, [x], x)
    assert model[0].bias is None and not torch.equal(model[1].running_mean, mean_before)


@pytest.fixture(scope="module")
def adarounded(tmp_path_factory, tiny_float_weights):
    tmp = tmp_path_factory.mktemp("adaround")
    cfg = tiny_config(tmp, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      model_path=str(tiny_float_weights),
                      calib={"num_batches": 2, "methods": ["max"], "step_batches": 2,
                             "steps": ["equalize", "bias_correction", "adaround"],
                             "adaround_iterations": 40},
                      export={"target": "onnxruntime", "latency_runs": 3})
    assert calibrate_main(["--config", str(cfg), "--set", f"output_dir={tmp / 'cal'}"]) == 0
    return tmp, cfg


def test_calibrate_reports_each_step_beside_the_range_methods(adarounded):
    tmp, _cfg = adarounded
    results = json.loads((tmp / "cal" / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["max", "max + equalize", "max + bias correction", "max + AdaRound",
                          "max + equalize + bias correction + AdaRound"]
    assert all(r["calib_seconds"] > 0 for r in rows.values())
    ada = rows["max + AdaRound"]
    assert ada["config"] == {"calib.method": "max", "calib.equalize": False,
                             "calib.bias_correction": False, "calib.weight_rounding": "adaround"}
    assert set(ada["steps"]["adaround"]["layers"]) == {"stem.0.0", "stem.1.0", "block.0",
                                                        "head"}
    assert results["best_config"] == rows[results["best_method"]]["config"]
    ckpt = read_checkpoint(tmp / "cal" / "quantized.pt")
    assert ckpt["method"] == results["best_method"]


def test_every_step_saved_restored_trained_and_exported(adarounded):
    """The model of all steps together (batch norms folded) restores from its checkpoint to
    the same outputs, is QAT calib's start, and its INT8 ONNX export matches its fake-quant
    model as any other export does."""
    tmp, cfg = adarounded
    keys = ["calib.equalize=true", "calib.bias_correction=true",
            "calib.weight_rounding=adaround"]
    out = tmp / "all"
    config = load_config(cfg, [*keys, f"output_dir={out}"])
    session = Session(config, out, load_hooks(config.hooks), torch.device("cpu"))
    model, _ = quantized_model(session)
    path = save_quantized(out / "quantized.pt", model, config)
    assert len(read_checkpoint(path)["folded"]) == 3
    restored = load_quantized(session, path).eval()
    assert not [m for m in restored.modules() if isinstance(m, nn.BatchNorm2d)]
    loader = session.hooks.get_data_loader(config, "val")
    images, _ = next(iter(loader))
    with torch.no_grad():
        assert torch.equal(restored(images), model.eval()(images))
    float_metric = evaluate_model(session, model, loader, build_criterion(session))["miou"]

    sets = [arg for key in keys for arg in ("--set", key)]
    assert train_main(["--mode", "calib", "--config", str(cfg), *sets, "--set", "qat.epochs=1",
                       "--set", "qat.freeze_ranges_epochs=0",
                       "--set", f"output_dir={tmp / 'qat'}"]) == 0
    qat = json.loads((tmp / "qat" / "results.json").read_text())
    assert qat["baselines"]["ptq"]["miou"] == pytest.approx(float_metric, abs=1e-6)
    assert export_main(["--config", str(cfg), "--set", f"model_path={path}",
                        "--set", f"output_dir={tmp / 'export'}"]) == 0
    export = json.loads((tmp / "export" / "results.json").read_text())
    assert export["metric_drop"] <= 0.3 and export["layer_check"]["first_divergence"] is None
    assert export["optimized_int8_graph"]["float"] == {}
