"""Bad input exits with status 2 and one line on stderr, without a traceback."""
from __future__ import annotations

import pytest

from .helpers import run_script, tiny_config


def _one_line_error(result):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.mark.parametrize("case,expected", [
    ("unknown_key", "did you mean 'train.lr'"),
    ("wrong_type", "'train.epochs' must be an integer"),
    ("missing_config", "does not exist"),
    ("missing_hooks", "hooks file"),
    ("hooks_without_get_model", "no get_model()"),
    ("missing_data", "data_path"),
    ("not_a_checkpoint", "not a PyTorch checkpoint"),
])
def test_bad_input(tmp_path, case, expected):
    cfg = tiny_config(tmp_path)
    args = ["--mode", "float", "--config", str(cfg)]
    if case == "unknown_key":
        args += ["--set", "train.lrr=0.1"]
    elif case == "wrong_type":
        args += ["--set", "train.epochs=two"]
    elif case == "missing_config":
        args[3] = str(tmp_path / "nope.yaml")
    elif case == "missing_hooks":
        args += ["--set", f"hooks={tmp_path / 'nope.py'}"]
    elif case == "hooks_without_get_model":
        bad = tmp_path / "bad_hooks.py"
        bad.write_text("def get_data_loader(cfg, split): pass\n")
        args += ["--set", f"hooks={bad}"]
    elif case == "missing_data":
        args += ["--set", f"data_path={tmp_path / 'no_data'}"]
    elif case == "not_a_checkpoint":
        junk = tmp_path / "weights.pt"
        junk.write_text("not weights")
        args += ["--set", f"model_path={junk}"]
    line = _one_line_error(run_script("qat_train.py", *args))
    assert expected in line
    assert not (tmp_path / "run").exists()      # nothing written for a run that never started
