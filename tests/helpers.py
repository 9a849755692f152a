"""Shared helpers for the script-level tests: a tiny run config and a subprocess runner."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_USER = {"image_size": [64, 64], "crop_size": [64, 64], "batch_size": 4,
             "eval_batch_size": 4, "train_images": 8, "val_images": 4, "calib_images": 4,
             "ohem_min_kept": 1000}


TINY_HOOKS = str(ROOT / "tests" / "fixtures" / "tiny_hooks.py")
TINY_NET_USER = {**TINY_USER, "image_size": [64, 128], "crop_size": [64, 128],
                 "train_images": 16, "val_images": 8}


def tiny_config(tmp_path: Path, **overrides) -> Path:
    """A config for a seconds-long run of PIDNet-S on 64x64 synthetic scenes (pass
    ``hooks=TINY_HOOKS`` for a small conv net instead)."""
    cfg = {"hooks": str(ROOT / "my_model.py"), "output_dir": str(tmp_path / "run"),
           "device": "cpu", "train": {"epochs": 2, "lr": 0.01, "log_interval": 0},
           "user": dict(TINY_USER)}
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_torchrun(script: str, *args: str, ranks: int = 2,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` under ``torchrun --standalone`` with ``ranks`` CPU processes (one thread each)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", str(ROOT / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: its error lines from every rank (a rank's own traceback is
    far above torchrun's summary), then the end of stderr."""
    errors = [line for line in proc.stderr.splitlines()
              if any(word in line for word in ("Error", "error:", "terminate", "what()"))]
    return "\n".join(errors[:40]) + "\n...\n" + proc.stderr[-1500:]


def script_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every script under test runs in: two threads whatever the suite's own
    OMP_NUM_THREADS, so runs compared value for value reduce in the same order."""
    return {**(env or os.environ), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


def interruptible() -> None:
    """In a child before it starts: SIGINT delivered and left to Python's own handler. An
    ignored or blocked SIGINT survives exec, and a child of a suite that inherited one (a
    background job, or a library in the suite's process) never raises KeyboardInterrupt: in
    the full suite a test that sends SIGINT saw it vanish, where the same test alone passed."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(script: str, *args: str) -> subprocess.Popen:
    """``script`` started in the background, silent, in ``script_env``: a run to interrupt."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                            env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=interruptible)


def run_script(script: str, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=script_env(env), cwd=ROOT)
