"""Functional ops made modules, and one module per call site, with ``torch.fx``.

Module quantizers reach only what a model does through modules. A model that writes its
residual adds, products, activations, concatenations and resizes as functions (torchvision's
do) leaves them in float, and a parameter-free module called several times (one ``ReLU`` for
every activation of a network) shares one quantizer, and so one range, among tensors of
different ranges. ``rewrite`` traces the model with ``torch.fx`` and returns a ``GraphModule``
in which each such function call is a module of ``pidnet.model``'s merge ops (or ``torch.nn``'s
activations) and each call of a shared parameter-free module is a copy of its own, so the
quantizer placement gives every call site its own quantizer. Weights, buffers and the names
of the modules that were there stay as they were: a float state dict loads unchanged.

The rewrite is a function of the model's code alone (no example input), so restoring a
checkpoint repeats it exactly. Python control flow is fixed at trace time, as ``torch.fx``
does: a forward that branches on ``self.training`` is traced as it runs in training.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..model import Add, Concat, Mul, Resize

logger = logging.getLogger(__name__)

# results that describe a tensor rather than being one: ``x.shape[-2:]`` and arithmetic on it
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_META_METHODS = {"size", "dim", "numel", "tolist", "item", "type", "__len__"}

_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_ACTIVATIONS = {torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, torch.relu: nn.ReLU,
                F.relu: nn.ReLU, F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid}
_ACTIVATION_METHODS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, with the modules the quantizer placement knows (``leaves``)
    kept whole instead of traced through."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def rewrite(model: nn.Module, leaves: tuple[type, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` traced and rewritten (see the module's docstring), and what changed:
    ``{"modules": n, "call_sites": n}``. A model ``torch.fx`` cannot trace is returned as it
    is, with ``{"error": why}``."""
    try:
        tracer = _Tracer(leaves)
        graph = tracer.trace(model)
    except Exception as exc:   # any failure of the trace: the model stays as it was
        return model, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # the model's own modules, not the plain containers GraphModule would copy them into:
    # ``model.layer1[0]`` still indexes, and modules no traced call reaches stay in the
    # state dict, so every checkpoint of the float model loads
    for name, child in model.named_children():
        setattr(gm, name, child)
    for name, tensor in [*model.named_parameters(recurse=False),
                         *model.named_buffers(recurse=False)]:
        if not hasattr(gm, name):
            setattr(gm, name, tensor)
    names = {n for n, _ in gm.named_modules()}
    made = _functions_to_modules(gm, names)
    copies = _one_module_per_call(gm, names)
    if not made and not copies:   # nothing to rewrite: the model stays the user's own class
        return model, {"modules": 0, "call_sites": 0}
    gm.graph.lint()
    gm.recompile()
    if set(gm.state_dict()) != set(model.state_dict()):
        missing = sorted(set(model.state_dict()) ^ set(gm.state_dict()))[:3]
        return model, {"error": f"the traced model's weights differ in {', '.join(missing)}"}
    gm.train(model.training)
    return gm, {"modules": made, "call_sites": copies}


def _has_module(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _is_meta(node: Any, meta: set[fx.Node]) -> bool:
    """Whether ``node`` (a graph value or a constant) is not a tensor: a constant, or a size,
    dtype or device, or arithmetic on them."""
    if not isinstance(node, fx.Node):
        return True
    return node in meta


def _meta_nodes(graph: fx.Graph) -> set[fx.Node]:
    meta: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is getattr and \
                node.args[1] in _META_ATTRS:
            meta.add(node)
        elif node.op == "call_method" and node.target in _META_METHODS:
            meta.add(node)
        elif node.op == "call_function" and node.target is len:
            meta.add(node)
        elif node.op == "call_function" and node.args and \
                getattr(node.target, "__module__", None) in ("_operator", "builtins", "math") \
                and all(_is_meta(a, meta) for a in (*node.args, *node.kwargs.values())):
            meta.add(node)   # getitem / arithmetic of sizes
    return meta


def _module_for(node: fx.Node, meta: set[fx.Node]) -> tuple[nn.Module, tuple, dict] | None:
    """The module that does what ``node`` does, with its arguments; ``None`` where none
    does (a constant operand, an option the module has not)."""
    args, kwargs = node.args, node.kwargs
    tensors = lambda *xs: all(isinstance(x, fx.Node) and x not in meta for x in xs)
    if node.op == "call_function":
        target = node.target
        if target in _ADD | _MUL and len(args) == 2 and not kwargs and tensors(*args):
            return (Add() if target in _ADD else Mul()), args, {}
        if target in _ACTIVATIONS and len(args) == 1 and tensors(args[0]) and \
                not kwargs.get("inplace", False):
            return _ACTIVATIONS[target](), args, {}
        if target is torch.cat and isinstance(args[0], (list, tuple)) and tensors(*args[0]):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int) and set(kwargs) <= {"dim"}:
                return Concat(dim), (list(args[0]),), {}
        if target is F.interpolate and tensors(args[0]) and len(args) == 1:
            options = dict(kwargs)
            size, scale = options.pop("size", None), options.pop("scale_factor", None)
            mode = options.pop("mode", "nearest")
            corners = options.pop("align_corners", None)
            if not options or all(v in (None, False) for v in options.values()):
                return (Resize(mode, corners), (args[0],),
                        {"size": size, "scale_factor": scale})
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(args) == 1 \
            and tensors(args[0]):
        return _ACTIVATION_METHODS[node.target](), args, {}
    if node.op == "call_method" and node.target in ("add", "mul") and len(args) == 2 and \
            not kwargs and tensors(*args):
        return (Add() if node.target == "add" else Mul()), args, {}
    return None


def _owner(node: fx.Node) -> str:
    """The innermost module whose forward made ``node`` ('' for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _outside_containers(gm: nn.Module, target: str) -> tuple[str, str]:
    """Where a copy of module ``target`` goes: beside it, or, when its parent is a
    ``Sequential`` (whose forward would call a new child) or another container, in the
    nearest ancestor that is none, named after the path between (``features_3_relu``)."""
    parts = target.split(".")
    base = [parts.pop()]
    while parts and isinstance(gm.get_submodule(".".join(parts)),
                               (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        base.insert(0, parts.pop())
    return ".".join(parts), "_".join(base)


def _free_name(gm: nn.Module, parent: str, base: str, names: set[str]) -> str:
    """``parent.base``, or ``parent.base_1``, ``_2``... where that is taken (by a module or
    any other attribute of ``parent``)."""
    prefix = f"{parent}." if parent else ""
    owner = gm.get_submodule(parent) if _has_module(gm, parent) else None
    name, k = f"{prefix}{base}", 0
    while name in names or (owner is not None and hasattr(owner, name.rpartition(".")[2])):
        k += 1
        name = f"{prefix}{base}_{k}"
    names.add(name)
    return name


def _functions_to_modules(gm: fx.GraphModule, names: set[str]) -> int:
    meta = _meta_nodes(gm.graph)
    made = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        found = _module_for(node, meta)
        if found is None:
            continue
        module, args, kwargs = found
        base = type(module).__name__.lower()
        name = _free_name(gm, _owner(node), base, names)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        made += 1
    return made


def _one_module_per_call(gm: fx.GraphModule, names: set[str]) -> int:
    """Every call after the first of a parameter-free module gets a copy of its own, named
    after it (``relu``, ``relu_1``, ...)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    copies = 0
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] < 2:
            continue
        if node.target not in seen:
            seen.add(node.target)
            continue
        module = gm.get_submodule(node.target)
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            continue   # shared weights stay shared
        parent, base = _outside_containers(gm, node.target)
        name = _free_name(gm, parent, base, names)
        gm.add_submodule(name, copy.deepcopy(module))
        node.target = name
        copies += 1
    return copies
