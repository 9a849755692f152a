from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from pidnet.checkpoint import read_checkpoint
from pidnet.train import main

from .helpers import (ROOT, TINY_HOOKS, TINY_NET_USER, TINY_USER, run_script, start_script,
                      tiny_config)


def test_float_training_writes_everything(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["--mode", "float", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().out.strip().endswith(str(run / "results.json"))
    results = json.loads((run / "results.json").read_text())
    assert results["metric"] == "miou" and len(results["epochs"]) == 2
    assert 0.0 <= results["best"] <= 100.0
    assert results["best"] == max(e["miou"] for e in results["epochs"])
    last = read_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["format_version"] == 1 and last["mode"] == "float"
    assert read_checkpoint(run / "best.pt")["best_metric"] == results["best"]
    assert (run / "epochs.csv").read_text().count("\n") == 3
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "log_interval": 0})
    assert main(["--mode", "float", "--config", str(cfg)]) == 0
    before = (tmp_path / "run" / "results.json").read_bytes()
    assert main(["--mode", "float", "--config", str(cfg)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_bytes() == before


def _state(path):
    return read_checkpoint(path)["model"]


@pytest.mark.parametrize("moment,ema,precise_bn,final", [
    ("before_first_checkpoint", 0.0, False, {}),
    ("after_first_checkpoint", 0.0, False, {}),
    ("after_first_checkpoint", 0.9, False, {}),
    ("after_first_checkpoint", 0.9, True, {}),
    ("after_first_checkpoint", 0.9, True, {"crop_size": [32, 64], "batch_size": 2})])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, moment, ema, precise_bn, final):
    """Killed at any moment, a resumed run ends on the same weights, with a weight average,
    with batch-norm statistics set from a pass over the train split when they freeze (the
    last 2 of 3 epochs: after the first checkpoint; on the small conv net, as PIDNet-S on 8
    tiny scenes diverges with batch norm frozen after one epoch, with or without the pass),
    and with those frozen epochs on a loader of their own (``train.final_phase_user``)."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    train = {"epochs": 3, "lr": 0.01, "log_interval": 0, "ema_decay": ema}
    extra = {}
    if precise_bn:
        train.update(precise_bn=True, freeze_bn_epochs=2, final_phase_user=final)
        extra = {"hooks": TINY_HOOKS, "user": {**TINY_USER, "train_images": 64}}
    ref_cfg = tiny_config(ref_dir, train=train, **extra)
    cut_cfg = tiny_config(cut_dir, train=train, **extra)
    ref_run = run_script("qat_train.py", "--mode", "float", "--config", str(ref_cfg))
    assert ref_run.returncode == 0
    assert ("statistics set from one pass over the train split" in ref_run.stderr) == precise_bn
    assert ("epochs 2-3 train on user keys" in ref_run.stderr) == bool(final)

    proc = start_script("qat_train.py", "--mode", "float", "--config", str(cut_cfg))
    last = cut_dir / "run" / "last.pt"
    # the run folder's config.yaml is written at start-up, last.pt after the first epoch
    mark = last if moment == "after_first_checkpoint" else cut_dir / "run" / "config.yaml"
    deadline = time.time() + 240
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists() and not (cut_dir / "run" / "results.json").exists()
    if moment == "after_first_checkpoint":
        assert read_checkpoint(last)["epoch"] < 3
    else:
        assert not last.exists()
    # a kill can land inside a write (epochs.csv follows last.pt): its temporary stays behind
    (cut_dir / "run" / ".epochs.csv.killed.tmp").write_text("epoch,mi")
    done = run_script("qat_train.py", "--mode", "float", "--config", str(cut_cfg), "--resume")
    assert done.returncode == 0, done.stderr
    ref, cut = read_checkpoint(ref_dir / "run" / "last.pt"), read_checkpoint(last)
    for weights in ("model", "live") if ema else ("model",):
        assert all(torch.allclose(ref[weights][k].float(), cut[weights][k].float(), atol=1e-6)
                   for k in ref[weights])
    if ema:   # the saved model is the average, not the live weights
        assert ref["ema_steps"] == cut["ema_steps"] > 0
        assert any(not torch.equal(v, ref["live"][k]) for k, v in ref["model"].items()
                   if v.is_floating_point())
    if final:   # 64 scenes: 16 steps in batches of 4, then 2 epochs of 32 in batches of 2
        assert ref["scheduler"]["last_epoch"] == cut["scheduler"]["last_epoch"] == 16 + 2 * 32
    ref_hist = json.loads((ref_dir / "run" / "results.json").read_text())["epochs"]
    cut_hist = json.loads((cut_dir / "run" / "results.json").read_text())["epochs"]
    assert [e["miou"] for e in ref_hist] == pytest.approx([e["miou"] for e in cut_hist])
    leftovers = [p.name for p in (cut_dir / "run").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_non_finite_loss_stops_with_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "lr": 1e30, "log_interval": 0})
    assert main(["--mode", "float", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "loss is" in err and "learning rate" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_float_fine_tune_with_frozen_batch_norm_keeps_its_statistics(tmp_path,
                                                                     tiny_float_weights):
    """The benchmark's float control: ``train.freeze_bn_epochs`` keeps the running statistics
    of the weights it starts from while the weights themselves train."""
    from .helpers import TINY_HOOKS, TINY_NET_USER
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      model_path=str(tiny_float_weights),
                      train={"epochs": 2, "lr": 0.01, "log_interval": 0, "freeze_bn_epochs": 2})
    assert main(["--mode", "float", "--config", str(cfg)]) == 0
    start = read_checkpoint(tiny_float_weights)["model"]
    end = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(start[k], end[k]) for k in stats)
    assert not torch.equal(start["head.weight"], end["head.weight"])


def test_recompute_batch_norm_sets_the_statistics_of_one_pass():
    """Each batch norm's running statistics become the pass's average of the batch means and
    unbiased variances, whatever they held before; the weights and the model's mode stay; dict
    inputs reach the model as keywords."""
    from torch import nn

    from pidnet.engine import recompute_batch_norm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, image):
            return self.bn(self.conv(image))

    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_mean.fill_(5.0)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    batches = [torch.randn(2, 3, 6, 6) * (i + 1) + i for i in range(3)]
    assert recompute_batch_norm(model, [({"image": b}, None) for b in batches],
                                torch.device("cpu")) == 1
    with torch.no_grad():
        features = [model.conv(b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var((0, 2, 3)) for f in features]).mean(0)
    assert torch.allclose(model.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(model.bn.running_var, var, rtol=1e-4)
    assert not model.training and model.bn.momentum == 0.1
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_precise_bn_without_frozen_epochs_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "precise_bn": True, "freeze_bn_epochs": 0})
    assert main(["--mode", "float", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.precise_bn" in err and "train.freeze_bn_epochs" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_precise_bn_keeps_the_statistics_of_a_run_frozen_throughout(tmp_path, capsys):
    """Frozen from its first epoch, a run keeps the batch-norm statistics its model came with
    (a frozen phase before may have trained against them): no pass, the buffers untouched."""
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      train={"epochs": 1, "freeze_bn_epochs": 1, "precise_bn": True,
                             "log_interval": 0})
    assert main(["--mode", "float", "--config", str(cfg)]) == 0
    assert "statistics set from one pass" not in capsys.readouterr().err
    state = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert means and all(torch.equal(m, torch.zeros_like(m)) for m in means)
    assert all(torch.equal(v, torch.ones_like(v)) for v in variances)


@pytest.mark.parametrize("train,user_key", [
    ({"freeze_bn_epochs": 0, "final_phase_user": {"crop_size": [64, 64]}}, "freeze_bn_epochs"),
    ({"freeze_bn_epochs": 1, "final_phase_user": {"crop_sise": [64, 64]}}, "user.crop_sise"),
    ({"freeze_bn_epochs": 1, "final_phase_user": {"crop_size": [64]}}, "user.crop_size")])
def test_bad_final_phase_user_is_refused_before_any_work(tmp_path, capsys, train, user_key):
    cfg = tiny_config(tmp_path, train={"epochs": 2, "log_interval": 0, **train})
    assert main(["--mode", "float", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.final_phase_user" in err[0] and user_key in err[0]
    assert not (tmp_path / "run").exists()


def test_final_phase_user_needs_hooks_that_read_the_config(tmp_path, capsys):
    cfg = tiny_config(tmp_path, hooks=str(ROOT / "tests" / "fixtures" / "fragile_hooks.py"),
                      train={"epochs": 2, "freeze_bn_epochs": 1,
                             "final_phase_user": {"batch_size": 2}})
    assert main(["--mode", "float", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "get_data_loader(data_path)" in err and "final_phase_user={}" in err
