from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

from pidnet.config import load_config
from pidnet.errors import ConfigError, HooksError
from pidnet.hooks import load_hooks


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain: {lr: 0.5, epochs: 2}\nuser: {anything: [1, 2]}\n")
    cfg = load_config(path, ["train.lr=0.25", "calib.methods=[max, mse]", "data_path=/a=b"])
    assert cfg.seed == 3 and cfg.train.epochs == 2 and cfg.train.lr == 0.25
    assert cfg.calib.methods == ["max", "mse"] and cfg.data_path == "/a=b"
    assert cfg.user == {"anything": [1, 2]}
    assert cfg.train.momentum == 0.9            # default kept


def test_original_readme_flat_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_path": "m.pt", "data_path": "d", "tolerance": 1.5,
                                    "output_file": "sel.pt"}))
    cfg = load_config(path)
    assert cfg.sensitivity.tolerance == 1.5 and cfg.sensitivity.output_file == "sel.pt"
    assert cfg.model_path == "m.pt"


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("seed=1.5", "'seed' must be an integer"),
    ("seed=true", "'seed' must be an integer"),
    ("train.lr=fast", "'train.lr' must be a number"),
    ("device=gpu", "must be one of auto, cpu, cuda"),
    ("calib.methods=[max, foo]", "got 'foo'"),
    ("calib.methods=[]", "must not be empty"),
    ("calib.percentiles=[]", "must not be empty"),
    ("train=3", "must be a section"),
    ("noequals", "KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def _hooks_file(tmp_path, body):
    path = tmp_path / "hooks.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


NEW_STYLE = """
    import torch
    def get_model(cfg): return torch.nn.Conv2d(3, 2, 1)
    def get_data_loader(cfg, split): return [split]
    def get_optimizer(model, cfg): return torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    def get_criterion(cfg): return torch.nn.CrossEntropyLoss()
"""

LEGACY = """
    import torch
    def get_model(model_path): return ("loaded", model_path)
    def get_data_loader(data_path): return ["legacy", data_path]
    def get_optimizer(model): return "opt"
    def get_criterion(): return "crit"
"""


def test_current_signatures(tmp_path):
    hooks = load_hooks(_hooks_file(tmp_path, NEW_STYLE))
    cfg = load_config(None, ["train.lr=0.3"])
    model = hooks.get_model(cfg)
    assert hooks.get_data_loader(cfg, "calib") == ["calib"]
    assert hooks.get_optimizer(model, cfg).param_groups[0]["lr"] == 0.3
    assert not hooks.model_loads_itself and not hooks.has_evaluate


def test_original_readme_signatures_keep_working(tmp_path):
    hooks = load_hooks(_hooks_file(tmp_path, LEGACY))
    cfg = load_config(None, ["model_path=w.pt", "data_path=/data"])
    assert hooks.model_loads_itself
    assert hooks.get_data_loader(cfg, "val") == ["legacy", "/data"]
    assert hooks.get_optimizer(None, cfg) == "opt" and hooks.get_criterion(cfg) == "crit"
    with pytest.raises(HooksError, match="not a torch.nn.Module"):
        hooks.get_model(cfg)


def test_test_split_only_where_the_hooks_declare_one(tmp_path):
    cfg = load_config(None, ["model_path=w.pt"])
    for source in (NEW_STYLE, LEGACY):   # legacy hooks get one loader for every split
        hooks = load_hooks(_hooks_file(tmp_path, source))
        with pytest.raises(HooksError, match="HAS_TEST_SPLIT"):
            hooks.get_data_loader(cfg, "test")
    hooks = load_hooks(_hooks_file(tmp_path, NEW_STYLE + "    HAS_TEST_SPLIT = True\n"))
    assert hooks.get_data_loader(cfg, "test") == ["test"]


def test_my_model_test_scenes_are_held_out():
    from pidnet.hooks import load_hooks as load
    from tests.helpers import ROOT, TINY_USER
    cfg = load_config(None, [f"hooks={ROOT / 'my_model.py'}",
                             *(f"user.{k}={v}" for k, v in TINY_USER.items()),
                             "user.test_images=4"])
    hooks = load(cfg.hooks)
    images = {split: next(iter(hooks.get_data_loader(cfg, split)))[0]
              for split in ("val", "test", "calib")}
    assert images["test"].shape == images["val"].shape
    assert not torch.allclose(images["test"], images["val"])
    assert not torch.allclose(images["test"], images["calib"])


def test_hooks_errors(tmp_path):
    with pytest.raises(HooksError, match="does not exist"):
        load_hooks(str(tmp_path / "missing.py"))
    with pytest.raises(HooksError, match=r"no get_model\(\)"):
        load_hooks(_hooks_file(tmp_path, NEW_STYLE.replace("def get_model", "def other")))
    with pytest.raises(HooksError, match=r"expected get_data_loader\(cfg, split\)"):
        load_hooks(_hooks_file(tmp_path, NEW_STYLE.replace("(cfg, split)", "(a, b, c)")))
    with pytest.raises(HooksError, match="syntax error"):
        load_hooks(_hooks_file(tmp_path, NEW_STYLE + "\ndef broken(:\n"))
    with pytest.raises(HooksError, match="not found"):
        load_hooks("no_such_module_xyz")
