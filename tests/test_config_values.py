"""Every key with allowed values: the bad values just outside each bound stop a script with one
line naming the key (exit 2, nothing written); the values on the bounds are accepted."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from pidnet.calibrate import main as calibrate_main
from pidnet.config import Bounds, Config, all_bounds, load_config
from pidnet.train import main as train_main

from .helpers import tiny_config

EPS = 1e-6


def _kind(key: str) -> type:
    cls: typing.Any = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = args[0]
    return typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind


def _resolve(key: str, bound: float | str) -> float:
    if isinstance(bound, str):       # a sibling key: its default
        section = key.rsplit(".", 1)[0]
        return float(load_config(None, []).__getattribute__(section).__getattribute__(bound))
    return bound


def _cases(key: str, bounds: Bounds) -> tuple[list, list]:
    """(bad values just outside each bound, good values on each bound)."""
    step = 1 if _kind(key) is int else EPS
    bad, good = [], []
    if bounds.low is not None:
        low = _resolve(key, bounds.low)
        bad.append(low - step)
        good.append(low)
    if bounds.above is not None:
        bad.append(bounds.above)
        good.append(bounds.above + step)
    if bounds.high is not None:
        high = _resolve(key, bounds.high)
        bad.append(high + step)
        good.append(high)
    if bounds.below is not None:
        bad.append(bounds.below)
        good.append(bounds.below - step)
    return bad, good


# list keys: the items each test writes
LIST_LENGTHS = {"export.input_size": 2, "calib.percentiles": 1, "calib.adaround_beta": 2}


def _value(key: str, v: float) -> str:
    """``v`` as ``--set`` writes it for ``key``: every item of a list key."""
    v = int(v) if _kind(key) is int else v
    length = LIST_LENGTHS.get(key)
    return f"[{', '.join([repr(v)] * length)}]" if length else repr(v)


BAD = [(k, v) for k, b in all_bounds().items() for v in _cases(k, b)[0]]
GOOD = [(k, v) for k, b in all_bounds().items() for v in _cases(k, b)[1]]


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_bad_value_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, key, value):
    cfg = tiny_config(tmp_path)
    assert calibrate_main(["--config", str(cfg), "--set", f"{key}={_value(key, value)}"]) == 2
    line = _one_line_error(capsys)
    assert f"'{key}'" in line and "must be in" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value", GOOD, ids=[f"{k}={v}" for k, v in GOOD])
def test_value_on_the_bound_is_accepted(key, value):
    cfg = load_config(None, [f"{key}={_value(key, value)}"])
    section, _, name = key.rpartition(".")
    got = getattr(getattr(cfg, section) if section else cfg, name)
    value = int(value) if _kind(key) is int else value
    assert got == (pytest.approx([value] * LIST_LENGTHS[key]) if key in LIST_LENGTHS
                   else pytest.approx(value))


def test_every_numeric_key_has_bounds():
    numeric = []
    for f in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[f.name]
        keys = ([f"{f.name}.{g.name}" for g in dataclasses.fields(hint)]
                if dataclasses.is_dataclass(hint) else [f.name])
        for key in keys:
            if _kind(key) in (int, float):
                numeric.append(key)
    assert sorted(numeric) == sorted(all_bounds())


@pytest.mark.parametrize("args,key", [
    (["--set", "quant.weight_bits=1"], "quant.weight_bits"),
    (["--set", "quant.weight_bits=33"], "quant.weight_bits"),
    (["--set", "quant.num_bins=0"], "quant.num_bins"),
    (["--set", "calib.percentile=150"], "calib.percentile"),
    (["--set", "calib.percentiles=[99.5, 0]"], "calib.percentiles"),
    (["--set", "calib.num_batches=0"], "calib.num_batches"),
    (["--set", "user.model=pidnet_x"], "user.model"),
    (["--set", "user.batch_size=0"], "user.batch_size"),
    (["--set", "user.image_size=[64]"], "user.image_size"),
])
def test_reported_cases_in_calibrate(tmp_path, capsys, args, key):
    cfg = tiny_config(tmp_path)
    assert calibrate_main(["--config", str(cfg), *args]) == 2
    assert f"'{key}'" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,key", [
    (["--set", "qat.epochs=0"], "qat.epochs"),
    (["--set", "qat.lr=-1"], "qat.lr"),
    (["--set", "qat.freeze_bn_epochs=-2"], "qat.freeze_bn_epochs"),
    (["--set", "qat.freeze_bn_epochs=4"], "qat.freeze_bn_epochs"),
    (["--set", "qat.range_momentum=1.5"], "qat.range_momentum"),
])
def test_reported_cases_in_qat(tmp_path, capsys, args, key):
    cfg = tiny_config(tmp_path)
    assert train_main(["--mode", "calib", "--config", str(cfg), *args]) == 2
    assert f"'{key}'" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_exclude_naming_no_layer_is_one_line_before_calibration(tmp_path, capsys,
                                                               tiny_float_weights):
    from .helpers import TINY_HOOKS, TINY_NET_USER

    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      model_path=str(tiny_float_weights))
    assert calibrate_main(["--config", str(cfg), "--set", "quant.exclude=[nosuchlayer]"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]       # after the float model's evaluation log
    assert line.startswith("error: ") and "nosuchlayer" in line and "quant.exclude" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_hooks_report_bad_settings_in_one_line_and_bugs_with_their_traceback(tmp_path, capsys):
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "from pidnet.errors import ConfigError\n"
        "from tests.fixtures.fragile_hooks import (get_model, get_data_loader, get_optimizer,\n"
        "                                          get_criterion)\n"
        "def check_config(cfg):\n"
        "    if cfg.user.get('width', 1) < 1:\n"
        "        raise ConfigError(f\"config key 'user.width' must be >= 1, got \"\n"
        "                          f\"{cfg.user['width']}\")\n"
        "    if cfg.user.get('bug'):\n"
        "        raise ZeroDivisionError('a bug in the hooks')\n")
    cfg = tiny_config(tmp_path, hooks=str(hooks), user={})
    assert calibrate_main(["--config", str(cfg), "--set", "user.width=0"]) == 2
    assert "'user.width'" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ZeroDivisionError):
        calibrate_main(["--config", str(cfg), "--set", "user.bug=true"])


def test_python_m_pidnet_config_lists_every_key():
    import subprocess
    import sys

    from pidnet.config import config_to_dict

    from .helpers import ROOT, script_env

    def flat(data, prefix=""):
        for k, v in data.items():
            if isinstance(v, dict) and k not in ("user", "final_phase_user"):   # sections
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    listed = subprocess.run([sys.executable, "-m", "pidnet.config"], capture_output=True,
                            text=True, cwd=ROOT, env=script_env(), check=True).stdout
    keys = [line.split()[0] for line in listed.splitlines()]
    assert keys == list(flat(config_to_dict(Config())))
    row = next(line for line in listed.splitlines() if line.startswith("qat.freeze_bn_epochs"))
    assert "int" in row and "default 1" in row and "[0, qat.epochs]" in row
    assert "list of str" in next(line for line in listed.splitlines()
                                 if line.startswith("quant.exclude"))
