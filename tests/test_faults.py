"""Faults other than a bad config value end in one line and lose nothing: non-finite weights
and activations, output folders that cannot be written, interrupts, inputs checked before the
run folder exists."""
from __future__ import annotations

import json
import resource
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from pidnet import quant
from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.config import QuantConfig
from pidnet.errors import NonFiniteError
from pidnet.train import main as train_main

from .fixtures.tiny_hooks import TinySegNet
from .helpers import (ROOT, TINY_HOOKS, TINY_NET_USER, interruptible, run_script, script_env,
                      tiny_config)


def _one_line(err: str, prefix: str = "error: ") -> str:
    """The single line a fault prints last, checked to be one line with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prefix), err
    return lines[-1]


def _tiny_calibrate(tmp_path, weights, **extra) -> list[str]:
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER, model_path=str(weights),
                      calib={"num_batches": 1, "methods": ["max"]}, **extra)
    return ["--config", str(cfg)]


def _weights_with(tmp_path, tiny_float_weights, key, value) -> str:
    ckpt = read_checkpoint(tiny_float_weights)
    ckpt["model"][key].view(-1)[0] = value
    path = tmp_path / "broken.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_before_anything_is_written(tmp_path, capsys,
                                                                  tiny_float_weights, value):
    broken = _weights_with(tmp_path, tiny_float_weights, "stem.1.0.weight", value)
    assert calibrate_main(_tiny_calibrate(tmp_path, broken)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "'stem.1.0.weight'" in line and "NaN or Inf" in line and "broken.pt" in line
    assert not (tmp_path / "run").exists()


def test_non_finite_activations_name_the_layer_that_made_them(tmp_path, capsys,
                                                              tiny_float_weights):
    # a negative running variance: finite weights, NaN out of that batch norm in eval mode
    broken = _weights_with(tmp_path, tiny_float_weights, "stem.1.1.running_var", -1.0)
    assert calibrate_main(_tiny_calibrate(tmp_path, broken)) == 1
    line = _one_line(capsys.readouterr().err)
    assert "non-finite" in line and "layer 'stem.1.1'" in line and "evaluating" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_statistics_name_the_layer_instead_of_crashing_in_the_histogram():
    torch.manual_seed(0)
    model = TinySegNet(4).eval()
    with torch.no_grad():
        model.block[1].running_var[3] = -1.0
    example = torch.randn(2, 3, 32, 32)
    model = quant.insert_quantizers(model, QuantConfig(), "tensorrt", example)
    with pytest.raises(NonFiniteError, match=r"calib batch 0 .* layer 'block\.1'"):
        quant.collect_stats(model, [(example, None)], torch.device("cpu"))
    # the quantizers are back on, every collector gone: the model is usable as before
    assert all(q._if_quant for q in quant.activation_quantizers(model).values())
    assert all(not q._forward_pre_hooks for q in quant.activation_quantizers(model).values())


@pytest.mark.parametrize("case", ["parent_is_a_file", "output_dir_is_a_file"])
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, tiny_float_weights,
                                                       case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    out = blocker / "run" if case == "parent_is_a_file" else blocker
    args = _tiny_calibrate(tmp_path, tiny_float_weights) + ["--set", f"output_dir={out}"]
    assert calibrate_main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out) in line
    assert ("Not a directory" if case == "parent_is_a_file" else "is a file") in line
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("case,expected", [
    ("directory", "is a directory"),
    ("truncated", "not a PyTorch checkpoint"),
    ("missing", "does not exist"),
])
def test_a_bad_model_path_is_refused_before_the_run_folder_exists(tmp_path, capsys,
                                                                  tiny_float_weights, case,
                                                                  expected):
    path = tmp_path / "weights.pt"
    if case == "directory":
        path.mkdir()
    elif case == "truncated":
        data = tiny_float_weights.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    assert calibrate_main(_tiny_calibrate(tmp_path, path)) == 2
    assert expected in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys):
    """A file-size limit makes every large write fail as a full disk does (EFBIG, not
    ENOSPC): the run stops with one line and last.pt is the one before."""
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      train={"epochs": 1, "lr": 0.05, "log_interval": 0})
    assert train_main(["--mode", "float", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt")}
    (run / "results.json").unlink()              # a run with an epoch left to train
    limit = len(before["last.pt"]) // 2
    assert (run / "config.yaml").stat().st_size < limit   # the config still fits

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "qat_train.py"), "--mode", "float", "--config", str(cfg),
         "--resume", "--set", "train.epochs=2"], capture_output=True, text=True,
        env=script_env(), cwd=ROOT, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = _one_line(proc.stderr)
    # the first checkpoint written (best.pt, as the epoch improved) fails; nothing after it runs
    assert str(run / "best.pt") in line and "the previous file is intact" in line
    assert {name: (run / name).read_bytes() for name in before} == before
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def _start(*args: str) -> subprocess.Popen:
    """A script in the background with its stderr kept, to interrupt."""
    return subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=ROOT,
                            env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)


def _wait_for(path, proc, seconds=240) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def test_sigterm_stops_with_one_line_and_its_command_resumes_to_the_same_weights(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    train = {"epochs": 3, "lr": 0.01, "log_interval": 0}
    ref_cfg, cut_cfg = tiny_config(ref_dir, train=train), tiny_config(cut_dir, train=train)
    assert run_script("qat_train.py", "--mode", "float", "--config", str(ref_cfg)).returncode == 0

    run = cut_dir / "run"
    proc = _start("qat_train.py", "--mode", "float", "--config", str(cut_cfg))
    _wait_for(run / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    line = _one_line(err, "stopped by SIGTERM: ")
    assert f"{run / 'last.pt'} holds epoch" in line
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("python qat_train.py ") and command.endswith(" --resume")
    assert not (run / "results.json").exists()

    argv = shlex.split(command)
    argv[:2] = [sys.executable, str(ROOT / argv[1])]
    done = subprocess.run(argv, cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    ref, cut = (read_checkpoint(d / "run" / "last.pt")["model"] for d in (ref_dir, cut_dir))
    assert all(torch.allclose(ref[k].float(), cut[k].float(), atol=1e-6) for k in ref)
    ref_hist, cut_hist = (json.loads((d / "run" / "results.json").read_text())["epochs"]
                          for d in (ref_dir, cut_dir))
    assert [e["miou"] for e in ref_hist] == pytest.approx([e["miou"] for e in cut_hist])


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 3, "lr": 0.01, "log_interval": 0})
    proc = _start("qat_train.py", "--mode", "float", "--config", str(cfg))
    _wait_for(tmp_path / "run" / "config.yaml", proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    line = _one_line(err, "stopped by SIGINT: ")
    assert "nothing was saved" in line and line.endswith(" --resume")
    assert not (tmp_path / "run" / "last.pt").exists()
