"""Load the user's hooks file and present its functions behind one calling convention.

Current signatures (DESIGN.md)::

    get_model(cfg) -> nn.Module
    get_data_loader(cfg, split) -> iterable of (inputs, targets)     split: train | val | calib
                                                                     (| test, with HAS_TEST_SPLIT)
    get_optimizer(model, cfg) -> torch.optim.Optimizer
    get_criterion(cfg) -> callable(outputs, targets) -> scalar tensor
    evaluate(model, loader, cfg) -> dict[str, float]                 optional
    get_prediction(outputs) -> tensor                                optional: which output
                                                                     is the prediction
    check_config(cfg) -> None                                        optional: raise
                                                                     ConfigError on a bad value

The original README's signatures (``get_model(model_path)``, ``get_data_loader(data_path)``,
``get_optimizer(model)``, ``get_criterion()``) keep working.

A hooks file that sets ``HAS_TEST_SPLIT = True`` also serves ``split="test"``: labelled data
held out from training and from every choice, read only to report (``bench.qat_modes``).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .batches import describe, main_prediction
from .config import Config
from .errors import HooksError

REQUIRED = ("get_model", "get_data_loader", "get_optimizer", "get_criterion")
# hook name -> (current signature, legacy signature), as positional parameter names
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "get_model": (("cfg",), ("model_path",)),
    "get_data_loader": (("cfg", "split"), ("data_path",)),
    "get_optimizer": (("model", "cfg"), ("model",)),
    "get_criterion": (("cfg",), ()),
    "evaluate": (("model", "loader", "cfg"), ("model", "loader", "cfg")),
    "get_prediction": (("outputs",), ("outputs",)),
}
SPLITS = ("train", "val", "calib", "test")


def _import(spec: str) -> ModuleType:
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise HooksError(f"hooks file {spec} does not exist; set 'hooks' to a .py file or a "
                             "module name")
        module_spec = importlib.util.spec_from_file_location(f"pidnet_user_hooks_{path.stem}",
                                                             path)
        if module_spec is None or module_spec.loader is None:
            raise HooksError(f"hooks file {spec} cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise HooksError(f"hooks file {spec} has a syntax error at line {exc.lineno}") from None
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError:
        raise HooksError(f"hooks module {spec!r} not found; set 'hooks' to a .py file or an "
                         "importable module") from None


def _arity(func: Callable, name: str, spec: str) -> int:
    """Number of positional parameters that must be passed; checks against both forms."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        raise HooksError(f"{name} in {spec} is not a function") from None
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return len(SIGNATURES[name][0])
    current, legacy = SIGNATURES[name]
    for form in (current, legacy):
        if len(required) <= len(form) <= len(positional):
            return len(form)
    raise HooksError(f"{name} in {spec} takes ({', '.join(p.name for p in positional)}); "
                     f"expected {name}({', '.join(current)})")


@dataclass
class Hooks:
    """The user's hook functions, called with the current signatures whatever form they use."""

    module: ModuleType
    source: str
    _arity: dict[str, int]

    @property
    def model_loads_itself(self) -> bool:
        """True for ``get_model(model_path)``: the hook loads the weights, the toolkit does not."""
        return self._arity["get_model"] == 1 and self._param0("get_model") == "model_path"

    def _param0(self, name: str) -> str:
        params = list(inspect.signature(getattr(self.module, name)).parameters)
        return params[0] if params else ""

    def check_config(self, cfg: Config) -> None:
        """The optional ``check_config(cfg)`` hook: the hooks' own settings (``user:``) checked
        before any work; it reports a bad value by raising ``pidnet.errors.ConfigError``."""
        check = getattr(self.module, "check_config", None)
        if callable(check):
            check(cfg)

    def get_model(self, cfg: Config) -> nn.Module:
        arg = cfg.model_path if self.model_loads_itself else cfg
        model = self.module.get_model(arg)
        if not isinstance(model, nn.Module):
            raise HooksError(f"get_model in {self.source} returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        return model

    def get_data_loader(self, cfg: Config, split: str) -> Iterable:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test" and not self.has_test_split:
            raise HooksError(f"{self.source} offers no held-out test split (set "
                             "HAS_TEST_SPLIT = True in it when get_data_loader serves 'test')")
        if self._arity["get_data_loader"] == 1:
            return self.module.get_data_loader(cfg.data_path)
        return self.module.get_data_loader(cfg, split)

    def get_optimizer(self, model: nn.Module, cfg: Config):
        if self._arity["get_optimizer"] == 1:
            return self.module.get_optimizer(model)
        return self.module.get_optimizer(model, cfg)

    def get_criterion(self, cfg: Config) -> Callable[[Any, Any], Any]:
        if self._arity["get_criterion"] == 0:
            return self.module.get_criterion()
        return self.module.get_criterion(cfg)

    @property
    def has_test_split(self) -> bool:
        return self.reads_config and bool(getattr(self.module, "HAS_TEST_SPLIT", False))

    @property
    def reads_config(self) -> bool:
        """Whether ``get_data_loader`` takes the config (the original README's takes only
        ``data_path``, so the ``user:`` keys cannot reach it)."""
        return self._arity["get_data_loader"] == 2

    @property
    def returns_trained_model(self) -> bool:
        """False when the hooks file sets ``RETURNS_TRAINED_MODEL = False``: its ``get_model``
        builds an untrained network, so quantizing needs ``model_path``."""
        return bool(getattr(self.module, "RETURNS_TRAINED_MODEL", True))

    @property
    def has_evaluate(self) -> bool:
        return "evaluate" in self._arity

    def prediction(self, outputs: Any, cfg: Config) -> torch.Tensor:
        """The prediction among a forward's ``outputs``: the optional ``get_prediction(outputs)``
        hook, else config key ``prediction``, else the unambiguous cases of
        ``batches.main_prediction``. Anything else is a ``HooksError`` saying what to set."""
        if "get_prediction" in self._arity:
            found = self.module.get_prediction(outputs)
            if not isinstance(found, torch.Tensor):
                raise HooksError(f"get_prediction in {self.source} returned "
                                 f"{describe(found)}, not a tensor")
            return found
        try:
            return main_prediction(outputs, cfg.prediction)
        except ValueError as exc:
            raise HooksError(f"{exc}; set config key 'prediction' to the key or index of the "
                             f"prediction, or define get_prediction(outputs) in {self.source}"
                             ) from None

    def evaluate(self, model: nn.Module, loader: Iterable, cfg: Config) -> dict[str, float]:
        result = self.module.evaluate(model, loader, cfg)
        if not isinstance(result, dict) or not result:
            raise HooksError(f"evaluate in {self.source} must return a non-empty dict of "
                             f"metrics, got {result!r}")
        return {k: float(v) for k, v in result.items()}


def load_hooks(spec: str) -> Hooks:
    """Import the hooks file or module ``spec`` and check every hook's signature."""
    module = _import(spec)
    arity = {}
    for name in REQUIRED:
        func = getattr(module, name, None)
        if func is None:
            raise HooksError(f"hooks file {spec} has no {name}(); define "
                             f"{name}({', '.join(SIGNATURES[name][0])})")
        arity[name] = _arity(func, name, spec)
    for optional in ("evaluate", "get_prediction"):
        if callable(getattr(module, optional, None)):
            arity[optional] = _arity(getattr(module, optional), optional, spec)
    return Hooks(module, spec, arity)
