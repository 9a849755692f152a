"""Which module produced each tensor a module consumes, read off one forward pass.

Quantizer placement for onnxruntime and batch-norm folding need a little of the graph: does a
batch norm read a convolution's output, does a ReLU follow it, is a module's input already
quantized by its producer. Forward hooks record, for every module call, the module that
produced each tensor argument (``None`` for the model input or a functional op). In-place
modules (``ReLU(inplace=True)``) return the tensor they were given: they become its producer.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import call_model


@dataclass
class Dataflow:
    """``producers[name]``: for each call of module ``name``, the producer of each tensor
    argument. ``consumers[name]``: the modules that read an output of ``name``."""

    producers: dict[str, list[list[str | None]]] = field(default_factory=dict)
    consumers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def only_consumer(self, name: str) -> str | None:
        """The one module reading ``name``'s outputs, if there is exactly one."""
        readers = self.consumers.get(name, set())
        return next(iter(readers)) if len(readers) == 1 else None

    def inputs_from(self, name: str, position: int) -> set[str | None]:
        """Producers of argument ``position`` over every call of ``name``."""
        return {call[position] for call in self.producers.get(name, []) if position < len(call)}

    def sole_reader(self, name: str, modules: dict[str, nn.Module], kind: type | tuple[type, ...],
                    sole_input: bool = False) -> str | None:
        """The one module, of ``kind``, reading ``name``'s output; with ``sole_input`` it must
        also read nothing else (a batch norm to fold into ``name``; a ReLU may be shared)."""
        reader = self.only_consumer(name)
        if reader is None or not isinstance(modules[reader], kind):
            return None
        return reader if not sole_input or self.inputs_from(reader, 0) == {name} else None


def conv_batch_norm_pairs(model: nn.Module, flow: Dataflow) -> list[tuple[str, str]]:
    """(convolution, batch norm) for every batch norm that reads a convolution's output and
    nothing else, the convolution's only reader: the pairs inference folds into one
    convolution."""
    modules = dict(model.named_modules())
    pairs = []
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            bn = flow.sole_reader(name, modules, nn.BatchNorm2d, sole_input=True)
            if bn is not None:
                pairs.append((name, bn))
    return pairs


def _tensors(args: Iterable[Any]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):       # Concat takes a list: one slot per tensor
            out.extend(t if isinstance(t, torch.Tensor) else None for t in a)
        else:
            out.append(None)
    return out


def trace_dataflow(model: nn.Module, example: Any, skip: type | tuple[type, ...] = ()
                   ) -> Dataflow:
    """Run ``model(example)`` once in eval mode without gradients and record the dataflow
    between leaf modules: those whose children are all of the ``skip`` types (fake-quant
    modules, say), which are themselves not recorded."""
    flow = Dataflow()
    producer: dict[int, str] = {}
    alive: list[torch.Tensor] = []            # keep ids unique for the whole pass

    def pre(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            tensors = _tensors(args)
            alive.extend(t for t in tensors if t is not None)
            call = [producer.get(id(t)) if t is not None else None for t in tensors]
            flow.producers.setdefault(name, []).append(call)
            for p in call:
                if p is not None:
                    flow.consumers[p].add(name)
        return hook

    def post(name: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            for t in _tensors([output]):
                if t is not None:
                    alive.append(t)
                    producer[id(t)] = name
        return hook

    handles = []
    for name, module in model.named_modules():
        leaf = all(isinstance(c, skip) for c in module.children()) if skip else not list(
            module.children())
        if name and leaf and not (skip and isinstance(module, skip)):
            handles += [module.register_forward_pre_hook(pre(name)),
                        module.register_forward_hook(post(name))]
    forward_once(model, example, handles)
    return flow


def forward_once(model: nn.Module, example: Any, handles: list[Any]) -> None:
    """One forward pass of ``example`` in eval mode without gradients, for the hooks behind
    ``handles``, which are removed afterwards (the model's train/eval mode is restored)."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
