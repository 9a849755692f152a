from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_float_weights(tmp_path_factory) -> Path:
    """Float weights of the small conv net (tests/fixtures/tiny_hooks.py), trained once."""
    from pidnet.train import main

    from .helpers import TINY_HOOKS, TINY_NET_USER, tiny_config

    tmp = tmp_path_factory.mktemp("tiny_float")
    cfg = tiny_config(tmp, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      train={"epochs": 4, "lr": 0.05, "log_interval": 0})
    assert main(["--mode", "float", "--config", str(cfg)]) == 0
    return tmp / "run" / "best.pt"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


sys.dont_write_bytecode = True
