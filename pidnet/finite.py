"""NaN and Inf, named where they start: in loaded weights (an input error) and in activations
(the first layer that produced them), never passed on into histograms or metrics."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .batches import call_model
from .errors import NonFiniteError


def all_finite(obj: Any) -> bool:
    """Whether every floating-point tensor in ``obj`` (any nesting of tensors, lists, tuples
    and dicts) holds only finite values."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the tensors among ``named`` that hold a NaN or an Inf, in order."""
    return [name for name, value in named if isinstance(value, torch.Tensor)
            and not all_finite(value)]


def describe_nonfinite(names: list[str]) -> str:
    """``'conv1.weight'`` or ``'conv1.weight' (and 3 more tensors)``."""
    more = f" (and {len(names) - 1} more tensors)" if len(names) > 1 else ""
    return f"'{names[0]}'{more}"


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, inputs: Any) -> str:
    """Run ``inputs`` through ``model`` once and name the first module whose inputs are finite
    and whose output is not (modules checked as they finish, so the innermost first): where
    NaN or Inf start, not the modules that pass them on."""
    if not all_finite(inputs):
        return "the input batch itself"
    found: list[str] = []

    def watch(name: str):
        def hook(_module: nn.Module, args: Any, output: Any) -> None:
            if not found and not all_finite(output) and all_finite(args):
                found.append(name)
        return hook

    handles = [m.register_forward_hook(watch(n)) for n, m in model.named_modules() if n]
    try:
        call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return f"layer '{found[0]}'" if found else "the model's top-level forward"


class _NonFiniteOutput(Exception):
    def __init__(self, inputs: Any) -> None:
        super().__init__()
        self.inputs = inputs


@contextlib.contextmanager
def finite_outputs(model: nn.Module, doing: str) -> Iterator[None]:
    """Inside, a forward of ``model`` whose output holds a NaN or an Inf stops with a
    ``NonFiniteError`` naming the first layer that produced them (``doing``: what the run was
    doing, for the message)."""
    def check(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not all_finite(output):
            raise _NonFiniteOutput(kwargs if kwargs and not args else args[0])

    handle = model.register_forward_hook(check, with_kwargs=True)
    try:
        yield
    except _NonFiniteOutput as found:
        handle.remove()
        where = first_nonfinite_layer(model, found.inputs)
        raise NonFiniteError(f"non-finite values while {doing}: they start at {where}; check "
                             "that layer's weights and ranges, and the data") from None
    finally:
        handle.remove()
