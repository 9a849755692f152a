"""The three QAT approaches on a small conv net: they run, improve, resume, and end static."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

from pidnet import quant
from pidnet.checkpoint import load_weights, read_checkpoint
from pidnet.config import QuantConfig, load_config
from pidnet.hooks import load_hooks
from pidnet.pipeline import Session, evaluate_model, load_quantized, start_session
from pidnet.train import build_parser, direct_start, main, recalibrates

from .helpers import (TINY_HOOKS, TINY_NET_USER as USER, run_script, start_script,
                      tiny_config)


@pytest.fixture
def float_weights(tiny_float_weights):
    return tiny_float_weights


def _qat_config(tmp_path, float_weights, **qat):
    settings = {"epochs": 2, "lr": 0.02, "log_interval": 0, **qat}
    return tiny_config(tmp_path, hooks=TINY_HOOKS, user=USER, model_path=str(float_weights),
                       qat=settings, calib={"num_batches": 1})


@pytest.mark.parametrize("mode", ["calib", "stats", "direct"])
def test_each_mode_improves_on_its_quantized_start(tmp_path, float_weights, mode):
    assert main(["--mode", mode, "--config", str(_qat_config(tmp_path, float_weights))]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    base = results["baselines"]
    assert set(base) == {"float", "ptq", "start"} and base["ptq"]["method"] == "entropy"
    assert len(results["epochs"]) == 2
    assert results["best"] > base["start"]["miou"]
    ckpt = read_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["kind"] == "quantized" and "modelopt_state" in ckpt
    amax = [v for k, v in ckpt["model"].items() if k.endswith("input_quantizer._amax")]
    assert amax and all(torch.isfinite(a).all() and (a > 0).all() for a in amax)


def test_direct_ranges_move_from_their_data_free_start(tmp_path, float_weights):
    assert main(["--mode", "direct", "--config", str(_qat_config(
        tmp_path, float_weights, direct_init="fixed", direct_init_amax=4.0))]) == 0
    last = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    amax = torch.stack([v.reshape(()) for k, v in last.items()
                        if k.endswith("_amax") and "weight_quantizer" not in k])
    moved = (amax - 4.0).abs()
    assert moved.min() > 1e-6 and moved.max() > 1e-2   # every learned range moved


def test_learned_range_gets_lsq_gradient():
    conv = nn.Sequential(nn.Conv2d(3, 4, 1))
    model = quant.insert_quantizers(conv, QuantConfig())
    (param,) = quant.make_ranges_learnable(model, init_amax=0.5)
    x = torch.randn(2, 3, 4, 4) * 2
    model(x).pow(2).sum().backward()
    assert param.grad is not None and param.grad.abs() > 0
    quant.make_ranges_static(model)
    q = model[0].input_quantizer
    assert type(q) is not quant.LearnedRangeQuantizer and float(q.amax) == pytest.approx(0.5)


FOUR_BITS = {"weight_bits": 4, "act_bits": 4}


@pytest.mark.parametrize("mode,qat", [("calib", {}), ("stats", {"stats_range": "mse"}),
                                      ("direct", {"learn_weight_ranges": True,
                                                  "direct_init": "lsq"})])
def test_each_mode_beats_ptq_at_4_bits(tmp_path, float_weights, mode, qat):
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=USER, model_path=str(float_weights),
                      quant=FOUR_BITS, calib={"num_batches": 1, "method": "mse"},
                      qat={"epochs": 3, "lr": 0.02, "log_interval": 0, **qat})
    assert main(["--mode", mode, "--config", str(cfg)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    base, final = results["baselines"], results["final"]["miou"]
    assert base["float"]["miou"] - base["ptq"]["miou"] > 1.0   # 4 bits hurt this model
    assert final > base["start"]["miou"] and final > base["ptq"]["miou"]


def _lsq_expected_grad(x: torch.Tensor, step: torch.Tensor, top: float, bottom: float,
                       count: int) -> torch.Tensor:
    """d sum(q(x)) / d step by LSQ's formula, times its gradient scale 1/sqrt(count * top)."""
    v = x / step
    d = torch.where(v >= top, torch.full_like(v, top),
                    torch.where(v <= bottom, torch.full_like(v, bottom), torch.round(v) - v))
    return d / (count * top) ** 0.5


def test_lsq_steps_start_and_get_gradients_as_in_the_paper():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    model = quant.insert_quantizers(conv, QuantConfig(weight_bits=4, act_bits=4))
    act, weight = quant.make_ranges_learnable(model, "lsq", weights=True)
    x = torch.randn(2, 3, 5, 5)
    quant.start_learned_ranges(model, x)
    w = model[0].weight.detach()
    # LSQ's start for inputs, 2 mean|x| / sqrt(Q_P) per tensor; weights keep the range
    # quant.weight_range set, max |w| per output channel (LSQ's 2 mean|w| / sqrt(Q_P) is far
    # coarser at 8 bits)
    assert float(act.detach()) == pytest.approx(2 * float(x.abs().mean()) / 7 ** 0.5, rel=1e-5)
    assert torch.allclose(weight.flatten(), w.abs().amax((1, 2, 3)) / 7)
    # signed 4 bits: Q_P = 7, Q_N = -8; N_F = one sample's features, N_W = weights per channel
    model[0].input_quantizer(x).sum().backward()
    expected = _lsq_expected_grad(x, act.detach(), 7, -8, 3 * 5 * 5).sum()
    assert float(act.grad) == pytest.approx(float(expected), rel=1e-5)
    # (off the grid's top, where max |w| sits exactly and the clipped and the rounded
    # branches of the formula meet)
    w = w * 0.99
    model[0].weight_quantizer(w).sum().backward()
    expected_w = _lsq_expected_grad(w, weight.detach(), 7, -8, 3 * 3 * 3).sum((1, 2, 3))
    assert torch.allclose(weight.grad.flatten(), expected_w, rtol=1e-4, atol=1e-6)
    assert quant.lsq_grad_scale(x, 1, 7, per_sample=True) == pytest.approx(1 / (75 * 7) ** 0.5)


def test_learned_weight_steps_round_trip(tmp_path, float_weights):
    cfg = _qat_config(tmp_path, float_weights, learn_weight_ranges=True)
    assert main(["--mode", "calib", "--config", str(cfg)]) == 0
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    weights = {k: v for k, v in ckpt["model"].items() if k.endswith("weight_quantizer._amax")}
    float_model = load_hooks(TINY_HOOKS).get_model(load_config(cfg))
    load_weights(float_model, float_weights)
    per_channel_max = {f"{n}.weight_quantizer._amax": m.weight.detach().abs().amax(
        dim=(1, 2, 3), keepdim=True) for n, m in float_model.named_modules()
        if isinstance(m, nn.Conv2d)}
    assert weights.keys() == per_channel_max.keys()
    # learned: the steps moved away from the max |w| they started at
    assert any(not torch.allclose(weights[k], per_channel_max[k]) for k in weights)
    session = start_session(build_parser().parse_args(
        ["--mode", "calib", "--config", str(cfg), "--set",
         f"output_dir={tmp_path / 'reload'}"]), default_output=str(tmp_path / "reload"))
    model = load_quantized(session, tmp_path / "run" / "last.pt")
    for name, q in quant.quantizers(model).items():
        key = f"{name}._amax"
        if key in weights:
            assert type(q) is not quant.LearnedRangeQuantizer
            assert torch.equal(q.amax.reshape(weights[key].shape), weights[key]), key
    metric = evaluate_model(session, model, session.hooks.get_data_loader(session.cfg, "val"),
                            None)["miou"]
    final = json.loads((tmp_path / "run" / "results.json").read_text())["final"]["miou"]
    assert metric == pytest.approx(final, abs=1e-6)


def _channel_max(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)


def test_tracked_weight_ranges_follow_the_weights_until_removed():
    model = quant.insert_quantizers(nn.Sequential(nn.Conv2d(3, 4, 1)), QuantConfig())
    conv, x = model[0], torch.randn(1, 3, 2, 2)
    start = conv.weight_quantizer.amax.clone()
    with torch.no_grad():
        conv.weight[1] *= 3                  # channel 1 grows past its starting range
    handle = quant.track_weight_ranges(model)
    model.eval()(x)                          # evaluation too: a checkpoint holds its weights'
    grown = conv.weight_quantizer.amax.clone()
    assert torch.equal(grown, _channel_max(conv.weight))
    assert float(grown[1]) == pytest.approx(3 * float(start[1]))
    assert torch.equal(grown[[0, 2, 3]], start[[0, 2, 3]])
    handle.remove()
    with torch.no_grad():
        conv.weight.mul_(0.5)
    model(x)
    assert torch.equal(conv.weight_quantizer.amax, grown)   # removed: the ranges stay


def test_qat_with_tracked_weight_ranges_saves_the_trained_weights_ranges(tmp_path,
                                                                        float_weights):
    cfg = _qat_config(tmp_path, float_weights, track_weight_ranges=True)
    assert main(["--mode", "calib", "--config", str(cfg)]) == 0
    state = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    float_state = read_checkpoint(float_weights)["model"]
    convs = [k[: -len(".weight_quantizer._amax")] for k in state
             if k.endswith(".weight_quantizer._amax")]
    assert convs
    for name in convs:
        amax = state[f"{name}.weight_quantizer._amax"]
        assert torch.equal(amax, _channel_max(state[f"{name}.weight"])), name
    assert any(not torch.allclose(state[f"{n}.weight_quantizer._amax"],
                                  _channel_max(float_state[f"{n}.weight"])) for n in convs)


def test_tracked_ranges_follow_the_data_then_stop_when_frozen():
    model = quant.insert_quantizers(nn.Sequential(nn.Conv2d(3, 4, 1)), QuantConfig())
    q = model[0].input_quantizer
    q.amax = torch.tensor(1.0)
    tracker = quant.RangeTracker(model, momentum=0.5, ratios={"0.input_quantizer": 1.0})
    model.train()
    model(torch.full((1, 3, 2, 2), 3.0))
    assert float(q.amax) == pytest.approx(2.0)         # 0.5 * 1 + 0.5 * 3
    model.eval()
    model(torch.full((1, 3, 2, 2), 9.0))
    assert float(q.amax) == pytest.approx(2.0)         # evaluation never moves ranges
    tracker.freeze()
    model.train()
    model(torch.full((1, 3, 2, 2), 9.0))
    assert float(q.amax) == pytest.approx(2.0)
    tracker.remove()


def test_a_tighter_start_keeps_its_ratio_to_the_batch_max():
    model = quant.insert_quantizers(nn.Sequential(nn.Conv2d(3, 4, 1)), QuantConfig())
    q = model[0].input_quantizer
    q.amax = torch.tensor(1.0)                          # e.g. an mse range under the max
    tracker = quant.RangeTracker(model, momentum=0.5, warmup=2)
    model.train()
    model(torch.full((1, 3, 2, 2), 2.0))
    model(torch.full((1, 3, 2, 2), 4.0))               # warm-up: mean batch max 3, amax kept
    assert float(q.amax) == pytest.approx(1.0)
    assert tracker.ratios == {"0.input_quantizer": pytest.approx(1 / 3)}
    model(torch.full((1, 3, 2, 2), 6.0))
    assert float(q.amax) == pytest.approx(1.5)         # 0.5 * 1 + 0.5 * 6 / 3
    tracker.remove()


def test_stats_ranges_frozen_in_the_final_epoch(tmp_path, float_weights):
    cfg = _qat_config(tmp_path, float_weights, epochs=3, freeze_ranges_epochs=2,
                      stats_recalibrate="never")
    assert main(["--mode", "stats", "--config", str(cfg)]) == 0
    history = json.loads((tmp_path / "run" / "results.json").read_text())["epochs"]
    assert len(history) == 3
    # last.pt holds the ranges after epoch 3; they must equal those after epoch 1, since the
    # last two epochs were frozen. Re-run 1 epoch with the same seed to get epoch-1 ranges.
    one = tmp_path / "one"
    one.mkdir()
    cfg1 = _qat_config(one, float_weights, epochs=3, freeze_ranges_epochs=2,
                       stats_recalibrate="never")
    proc = start_script("qat_train.py", "--mode", "stats", "--config", str(cfg1))
    _kill_after_first_checkpoint(proc, one / "run" / "last.pt")
    first = read_checkpoint(one / "run" / "last.pt")
    if first["epoch"] != 1:
        pytest.skip("the run finished more than one epoch before it could be stopped")
    final = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for key, value in first["model"].items():
        if key.endswith("input_quantizer._amax"):
            assert torch.equal(final[key], value), key


def _final_ranges(out, float_weights, **qat):
    """Train stats mode for 2 epochs (ranges frozen for the last, batch norm for both; PTQ
    baseline with max, stats with entropy); the final model and its activation ranges."""
    out.mkdir()
    qat = {"epochs": 2, "lr": 0.02, "log_interval": 0, "freeze_ranges_epochs": 1,
           "freeze_bn_epochs": 2, "stats_range": "entropy", **qat}
    cfg = tiny_config(out, hooks=TINY_HOOKS, user=USER, model_path=str(float_weights),
                      qat=qat, calib={"num_batches": 1, "method": "max"})
    assert main(["--mode", "stats", "--config", str(cfg)]) == 0
    config = load_config(cfg, [])
    session = Session(config, out, load_hooks(config.hooks), torch.device("cpu"))
    model = load_quantized(session, out / "run" / "last.pt").eval()
    return session, model, {n: float(q.amax) for n, q in
                            quant.activation_quantizers(model).items()}


def test_stats_recalibrate_sets_the_frozen_ranges_from_the_trained_network(tmp_path,
                                                                            float_weights):
    """qat.stats_recalibrate replaces the tracked ranges as they freeze by stats_range on the
    trained network's statistics (entropy here, not calib.method's max)."""
    _, _, recalibrated = _final_ranges(tmp_path / "on", float_weights, stats_recalibrate="always")
    _, _, tracked = _final_ranges(tmp_path / "off", float_weights, stats_recalibrate="never")
    moved = [n for n in tracked if abs(recalibrated[n] / tracked[n] - 1) > 0.01]
    assert len(moved) >= len(tracked) // 2
    # with a learning rate of 1e-9 the network recalibrated is the final one
    session, model, ranges = _final_ranges(tmp_path / "still", float_weights, lr=1e-9,
                                           stats_recalibrate="always")
    stats = quant.collect_stats(model, session.hooks.get_data_loader(session.cfg, "calib"),
                                session.device, 1)
    quant.apply_ranges(model, stats, "entropy")
    for name, q in quant.activation_quantizers(model).items():
        assert ranges[name] == pytest.approx(float(q.amax), rel=1e-4), name


def test_stats_recalibrate_auto_means_8_bit_activations(tmp_path):
    base = load_config(tiny_config(tmp_path), [])
    for setting, act_bits, expected in (("auto", 8, True), ("auto", 4, False),
                                        ("always", 4, True), ("never", 8, False)):
        cfg = load_config(tiny_config(tmp_path), [f"qat.stats_recalibrate={setting}",
                                                  f"quant.act_bits={act_bits}"])
        assert recalibrates(cfg) is expected, (setting, act_bits)
    assert base.qat.stats_recalibrate == "auto"


def test_direct_auto_starts_from_the_first_batch_at_8_bits_only(tmp_path, float_weights):
    """qat_train.py follows direct_start: with a learning rate too small to move them, the
    ranges end where they started: LSQ's data-derived ones at 8 bits, direct_init_amax at 4."""
    ranges = {}
    for act_bits in (8, 4):
        folder = tmp_path / str(act_bits)
        folder.mkdir()
        config = tiny_config(folder, hooks=TINY_HOOKS, user=USER, model_path=str(float_weights),
                             calib={"num_batches": 1}, quant={"act_bits": act_bits},
                             qat={"epochs": 1, "lr": 1e-9, "log_interval": 0,
                                  "freeze_ranges_epochs": 0, "direct_init": "auto",
                                  "direct_init_amax": 4.0})
        assert main(["--mode", "direct", "--config", str(config)]) == 0
        last = read_checkpoint(folder / "run" / "last.pt")["model"]
        ranges[act_bits] = [float(v) for k, v in last.items()
                            if k.endswith("_amax") and "weight_quantizer" not in k]
    assert ranges[4] and all(a == pytest.approx(4.0, rel=1e-4) for a in ranges[4])
    assert len(ranges[8]) == len(ranges[4])
    assert all(abs(a - 4.0) > 1e-2 for a in ranges[8])


def test_direct_init_auto_means_lsq_at_8_bit_activations(tmp_path):
    for setting, act_bits, expected in (("auto", 8, "lsq"), ("auto", 4, "fixed"),
                                        ("lsq", 4, "lsq"), ("fixed", 8, "fixed")):
        cfg = load_config(tiny_config(tmp_path), [f"qat.direct_init={setting}",
                                                  f"quant.act_bits={act_bits}"])
        assert direct_start(cfg) == expected, (setting, act_bits)
    assert load_config(tiny_config(tmp_path), []).qat.direct_init == "auto"


def _kill_after_first_checkpoint(proc: subprocess.Popen, path) -> None:
    deadline = time.time() + 240
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, float_weights):
    (tmp_path / "ref").mkdir(), (tmp_path / "cut").mkdir()
    ref_cfg = _qat_config(tmp_path / "ref", float_weights, epochs=3)
    cut_cfg = _qat_config(tmp_path / "cut", float_weights, epochs=3)
    assert run_script("qat_train.py", "--mode", "direct", "--config",
                      str(ref_cfg)).returncode == 0
    proc = start_script("qat_train.py", "--mode", "direct", "--config", str(cut_cfg))
    last = tmp_path / "cut" / "run" / "last.pt"
    _kill_after_first_checkpoint(proc, last)
    assert read_checkpoint(last)["epoch"] < 3
    done = run_script("qat_train.py", "--mode", "direct", "--config", str(cut_cfg), "--resume")
    assert done.returncode == 0, done.stderr
    ref = read_checkpoint(tmp_path / "ref" / "run" / "last.pt")["model"]
    cut = read_checkpoint(last)["model"]
    assert ref.keys() == cut.keys()
    for key in ref:
        assert torch.allclose(ref[key].float(), cut[key].float(), atol=1e-6), key


def test_qat_needs_float_weights(tmp_path, capsys):
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=USER)
    assert main(["--mode", "calib", "--config", str(cfg)]) == 2
    assert "model_path" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()          # bad input touches nothing


@pytest.mark.parametrize("mode", ["stats", "direct"])
def test_ranges_frozen_for_every_epoch_leave_a_mode_nothing_to_do(tmp_path, float_weights,
                                                                   mode, capsys):
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=USER, model_path=str(float_weights),
                      qat={"epochs": 2, "freeze_ranges_epochs": 2, "log_interval": 0})
    assert main(["--mode", mode, "--config", str(cfg)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'qat.freeze_ranges_epochs' (2)" in line and "qat.epochs (2)" in line
    assert not (tmp_path / "run").exists()
