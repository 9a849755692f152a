"""Quantizer placement, layer addressing and save/restore over NVIDIA's fake-quant modules."""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import torch
import torch.fx as fx
import torch.nn.functional as F
from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError
from ..model import Add, Blend, Complement, Concat, Mul, PixelAttention, Resize
from ..batches import call_model
from . import graph
from .dataflow import Dataflow, conv_batch_norm_pairs, forward_once, trace_dataflow

logger = logging.getLogger(__name__)

WEIGHT = "weight_quantizer"


class QuantAdd(Add):
    """``q_out(x + q(skip))``: the skip input carries the quantizer (NVIDIA's TensorRT
    placement); the output quantizer is used by the onnxruntime placement."""

    def _setup(self) -> None:
        self.skip_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(x + self.skip_quantizer(skip))


class _QuantOutput:
    """Mixin for a parameter-free op whose output the onnxruntime placement may quantize
    (the quantizer stays off otherwise), so onnxruntime runs the op as an integer kernel.
    ``unsigned_output``: the output is never negative, so it is quantized unsigned.
    ``known_amax``: quantizers (by attribute) whose input is bounded by construction, with
    that bound: their range before any data, which ``direct`` mode starts from (calibration
    and ``stats`` replace it with the data's)."""

    unsigned_output = False
    known_amax: dict[str, float] = {}

    def _setup(self) -> None:
        self.output_quantizer = TensorQuantizer()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output_quantizer(super().forward(*args, **kwargs))


class QuantReLU(_QuantOutput, nn.ReLU):
    """``q(relu(x))``: under the onnxruntime placement the ReLU output is quantized unsigned,
    so onnxruntime drops the ReLU into the integer kernel before it."""

    unsigned_output = True


class QuantSigmoid(_QuantOutput, nn.Sigmoid):
    """``q(sigmoid(x))``, unsigned under the onnxruntime placement (QLinearSigmoid)."""

    unsigned_output = True
    known_amax = {"output_quantizer": 1.0}


class QuantHardsigmoid(_QuantOutput, nn.Hardsigmoid):
    """``q(hardsigmoid(x))``, unsigned, in [0, 1] by construction (a squeeze-excite gate)."""

    unsigned_output = True
    known_amax = {"output_quantizer": 1.0}


class QuantHardswish(nn.Hardswish):
    """``q(x * q_gate(hardsigmoid(x)))``, hardswish written as the product onnxruntime runs
    it as (it has no integer HardSwish): the product is an integer QLinearMul of ``x`` and
    the gate, quantized unsigned in [0, 1], as onnxruntime's own ``quantize_static`` makes it;
    the output is signed (its minimum is -3/8)."""

    inner_quantizers = ("gate_quantizer",)
    unsigned_quantizers = ("gate_quantizer",)
    known_amax = {"gate_quantizer": 1.0}

    def _setup(self) -> None:
        self.gate_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(x * self.gate_quantizer(F.hardsigmoid(x)))


class QuantMul(_QuantOutput, Mul):
    """``q(x * y)`` (QLinearMul)."""


class QuantConcat(_QuantOutput, Concat):
    """``q(cat(tensors))`` (QLinearConcat)."""


class QuantComplement(_QuantOutput, Complement):
    """``q(1 - x)``: the float subtraction's output feeds an integer multiply."""

    known_amax = {"output_quantizer": 1.0}   # 1 - gate, the gate in [0, 1]


class QuantPixelAttention(_QuantOutput, PixelAttention):
    """``q(gate)``, unsigned. The dot product inside stays float: 8-bit per-tensor ranges on
    the product and on its channel sum (values in the thousands) took the demo's PIDNet-S from
    67.96 to 56.25 and 51.86 mIoU with max calibration, and onnxruntime runs them in float on
    a map of few channels."""

    unsigned_output = True
    known_amax = {"output_quantizer": 1.0}


class QuantResize(_QuantOutput, Resize):
    """``q(resize(x))``: the resized tensor feeds integer adds and multiplies."""


class QuantBlend(Blend):
    """``(1 - gate) * q(x) + gate * q(y)``. The TensorRT placement quantizes ``x`` and ``y``;
    the onnxruntime placement quantizes the complement, both products and the sum instead
    (``x``, ``y`` and the gate are quantized where they are made), so every step of the
    blend runs as an integer kernel."""

    inner_quantizers = ("complement_quantizer", "x_product_quantizer", "y_product_quantizer")
    known_amax = {"complement_quantizer": 1.0}   # 1 - gate, the gate in [0, 1]

    def _setup(self) -> None:
        for name in ("x_quantizer", "y_quantizer", *self.inner_quantizers, "output_quantizer"):
            setattr(self, name, TensorQuantizer())

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x, y = self.x_quantizer(x), self.y_quantizer(y)
        kept = self.x_product_quantizer(self.complement_quantizer(1 - gate) * x)
        taken = self.y_product_quantizer(gate * y)
        return self.output_quantizer(kept + taken)


# modelopt warns, per quantized class, that it has no tensor-parallel state under torchrun;
# this project uses data parallelism only.
warnings.filterwarnings("ignore", message="Distributed training is initialized but no "
                        "parallel_state")

# each module class the placement quantizes beyond modelopt's own, and its fake-quant twin
_TWINS = ((Add, QuantAdd), (Blend, QuantBlend), (nn.ReLU, QuantReLU), (nn.Sigmoid, QuantSigmoid),
          (nn.Hardsigmoid, QuantHardsigmoid), (nn.Hardswish, QuantHardswish), (Mul, QuantMul),
          (Concat, QuantConcat), (Complement, QuantComplement),
          (PixelAttention, QuantPixelAttention), (Resize, QuantResize))
for _original, _quantized in _TWINS:
    if _original not in QuantModuleRegistry:
        mtq.register(original_cls=_original, quantized_cls=_quantized)


def _quant_cfg(qcfg: QuantConfig, target: str) -> dict[str, Any]:
    act = {"num_bits": qcfg.act_bits, "axis": None, "pass_through_bwd": False}
    # weights on the symmetric grid +-(2^(b-1) - 1), TensorRT's: batch-norm folding flips the
    # sign of a channel whose gamma is negative, and the flipped grid must be the same grid
    weight = {"num_bits": qcfg.weight_bits, "axis": 0 if qcfg.per_channel else None,
              "narrow_range": True, "pass_through_bwd": False}
    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": f"*{WEIGHT}", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "cfg": act},
    ]
    if qcfg.residual:
        entries += [{"quantizer_name": f"*{n}", "cfg": act}
                    for n in ("skip_quantizer", "x_quantizer", "y_quantizer")]
    entries += [{"quantizer_name": "*", "parent_class": f"nn.BatchNorm{d}d", "enable": False}
                for d in (1, 2, 3)]
    return {"quant_cfg": entries, "algorithm": None}


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every fake-quant module by its full name, enabled or not."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def layer_quantizers(model: nn.Module) -> dict[str, dict[str, TensorQuantizer]]:
    """Layer name -> its enabled quantizers. A layer is a module owning at least one."""
    layers: dict[str, dict[str, TensorQuantizer]] = {}
    for name, module in model.named_modules():
        owned = {child: q for child, q in module.named_children()
                 if isinstance(q, TensorQuantizer) and q.is_enabled}
        if owned:
            layers[name] = owned
    return layers


def match_layers(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Names equal to a pattern, or matching it as a glob when it has ``*?[``. Never a
    substring: ``conv1`` does not catch ``layer1.0.conv1``."""
    patterns = list(patterns)
    return [n for n in names if any(n == p or (any(c in p for c in "*?[")
                                               and fnmatch.fnmatchcase(n, p)) for p in patterns)]


def insert_quantizers(model: nn.Module, qcfg: QuantConfig, target: str = "tensorrt",
                      example: Any = None) -> nn.Module:
    """Replace supported modules by their fake-quant twins in place, ranges not yet set.

    Weight ranges are set at once (``qcfg.weight_range``); activation ranges come from
    ``calibrate`` or from training. Layers in ``qcfg.exclude`` keep their quantizers disabled.
    The ``onnxruntime`` placement reads the dataflow off one forward pass of ``example`` (an
    input batch) to put one quantizer on each tensor, at its producer.
    """
    if target == "onnxruntime" and example is None:
        raise ValueError("the onnxruntime placement needs an example input")
    if target == "onnxruntime":
        model = _rewritten(model, example)
    flow = trace_dataflow(model, example) if target == "onnxruntime" or (
        not qcfg.per_channel and example is not None) else None
    if not qcfg.per_channel and flow is not None:
        _refuse_per_tensor_folding(model, flow, qcfg)
    if target != "onnxruntime":
        flow = None
    with contextlib.redirect_stdout(io.StringIO()):   # modelopt prints a count of its own
        model = mtq.quantize(model, _quant_cfg(qcfg, target), forward_loop=None)
    layers = layer_quantizers(model)
    # names are checked against every module that owns a quantizer, on or off: the
    # onnxruntime placement turns on output quantizers (a ReLU's) that are off until then, and
    # the layers a sensitivity sweep ranks are named after the placement
    owners = [n for n, m in model.named_modules()
              if any(isinstance(c, TensorQuantizer) for c in m.children())]
    excluded = match_layers(owners, qcfg.exclude)
    unknown = [p for p in qcfg.exclude if not match_layers(owners, [p])]
    if unknown:
        raise ConfigError(f"config key 'quant.exclude': {', '.join(unknown)} match no quantized "
                          f"layer; layer names look like {', '.join(list(layers)[:3])}")
    for name in excluded:
        for q in layers.get(name, {}).values():
            q.disable()
    if flow is not None:
        _place_at_producers(model, flow, qcfg, set(excluded))
    set_weight_ranges(model, qcfg.weight_range)
    layers = layer_quantizers(model)
    logger.info("quantizers: %d enabled in %d layers (%d layers excluded, %s placement)",
                sum(q.is_enabled for q in quantizers(model).values()), len(layers),
                len(excluded), target)
    return model


TRACED = "traced"   # a checkpoint's ``graph`` when its model was rewritten by ``graph.rewrite``
FOLDED = "_pidnet_folded"   # attribute: the (conv, batch norm) pairs ``ptq.equalize`` folded


def is_traced(model: nn.Module) -> bool:
    """Whether ``model`` is the ``torch.fx`` rewrite of a model (``graph.rewrite``): restoring
    its checkpoint repeats the rewrite first."""
    return isinstance(model, fx.GraphModule) and model.meta.get(TRACED) is not None


def graph_form(model: nn.Module) -> str | None:
    """What a quantized checkpoint records as ``graph``: ``TRACED`` for a rewritten model,
    which ``restore_quantized`` rewrites again before the quantizers go back in."""
    return TRACED if is_traced(model) else None


def _traced(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    traced, info = graph.rewrite(model, tuple(original for original, _ in _TWINS))
    if isinstance(traced, fx.GraphModule) and "error" not in info:
        traced.meta[TRACED] = info
        if hasattr(model, FOLDED):
            setattr(traced, FOLDED, getattr(model, FOLDED))
    return traced, info


def _rewritten(model: nn.Module, example: Any) -> nn.Module:
    """``model`` with its functional ops as modules and one module per call site
    (``graph.rewrite``), checked to compute what ``model`` computes on ``example``; the model
    as it is, and a log line saying what that costs, where it cannot be traced or the
    rewrite would change its outputs."""
    if is_traced(model):
        return model
    traced, info = _traced(model)
    if traced is model and "error" not in info:
        return model   # nothing to rewrite
    why = info.get("error")
    if why is None:
        was_training = model.training
        model.eval(), traced.eval()
        with torch.no_grad():
            same = _same_outputs(call_model(model, example), call_model(traced, example))
        model.train(was_training), traced.train(was_training)
        why = None if same else "the traced model computes other outputs"
    if why is not None:
        logger.warning("torch.fx cannot rewrite %s (%s): functions such as x + y stay float "
                       "in the onnxruntime graph and a module called more than once shares "
                       "one quantizer", type(model).__name__, why)
        return model
    logger.info("torch.fx rewrite: %d functional ops made modules, %d call sites of shared "
                "modules given their own", info["modules"], info["call_sites"])
    return traced


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
            a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max().clamp(min=1)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same_outputs(x, y) for x, y in zip(a, b))
    return a == b


def _refuse_per_tensor_folding(model: nn.Module, flow: Dataflow, qcfg: QuantConfig) -> None:
    """Per-tensor weights deploy as calibrated only where no batch norm is folded into the
    convolution: folding scales each output channel by its own factor, so the exported grid
    would not be the one calibrated or trained. Refused, with the layers, before any work."""
    pairs = [(c, b) for c, b in conv_batch_norm_pairs(model, flow)
             if not match_layers([c], qcfg.exclude)]
    if pairs:
        conv, bn = pairs[0]
        raise ConfigError(f"config key 'quant.per_channel': per-tensor weights cannot deploy as "
                          f"calibrated here: export folds batch norm into {len(pairs)} "
                          f"convolutions (e.g. {bn} into {conv}), which changes each output "
                          "channel's scale; keep quant.per_channel=true, or set "
                          "calib.equalize=true, which folds them before quantizing")


# input quantizers by the position of the argument they quantize
_INPUT_QUANTIZERS = {"input_quantizer": 0, "skip_quantizer": 1, "x_quantizer": 0,
                     "y_quantizer": 1}


def _place_at_producers(model: nn.Module, flow: Dataflow, qcfg: QuantConfig,
                        excluded: set[str]) -> None:
    """The onnxruntime placement: every op that can quantize its output does (convolutions,
    linear layers, adds, products, sigmoids, ReLUs, concatenations, pooling, resizes), as
    onnxruntime's integer kernels need a quantized input, weight and output. A convolution or
    linear layer quantizes after the batch norm and ReLU that follow it when they are its only
    reader, any other op after the ReLU that is; outputs that are never negative (twins with
    ``unsigned_output``: ReLU, sigmoid, the pixel attention) are unsigned, and a range known by
    construction (``known_amax``: a sigmoid's 1) is set before any data. A module whose
    input its producer already quantizes gets no input quantizer, so each tensor carries one
    Q/DQ pair."""
    modules = dict(model.named_modules())
    quantized: set[str] = set()
    for name, module in modules.items():
        if name in excluded or name not in flow.producers or \
                isinstance(module, nn.modules.batchnorm._BatchNorm) or \
                not isinstance(getattr(module, "output_quantizer", None), TensorQuantizer):
            continue
        end = name
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            end = flow.sole_reader(end, modules, nn.modules.batchnorm._BatchNorm, True) or end
        if not isinstance(module, nn.ReLU):
            end = flow.sole_reader(end, modules, nn.ReLU) or end
        if end in excluded or not hasattr(modules[end], "output_quantizer"):
            continue
        inner = [(module, attr) for attr in getattr(module, "inner_quantizers", ())]
        for owner, attr in [*inner, (modules[end], "output_quantizer")]:
            q = getattr(owner, attr)
            unsigned = attr in getattr(owner, "unsigned_quantizers", ()) or (
                attr == "output_quantizer" and getattr(owner, "unsigned_output", False))
            q.set_from_attribute_config({"num_bits": qcfg.act_bits, "axis": None,
                                         "unsigned": unsigned, "pass_through_bwd": False})
            q.enable()
            if attr in getattr(owner, "known_amax", {}):
                q.amax = torch.tensor(owner.known_amax[attr])
        quantized.add(end)
    for name, module in modules.items():
        for attr, position in _INPUT_QUANTIZERS.items():
            q = getattr(module, attr, None)
            sources = flow.inputs_from(name, position)
            if isinstance(q, TensorQuantizer) and q.is_enabled and sources and \
                    sources <= quantized:
                q.disable()


def grid_bounds(q: TensorQuantizer) -> tuple[float, float]:
    """The lowest and highest integer of ``q``'s grid (modelopt's: signed ones reach -2^(b-1)
    unless ``narrow_range``, as the weights are)."""
    top = 2.0 ** (q.num_bits - 1 + int(bool(q.unsigned))) - 1.0
    bottom = 0.0 if q.unsigned else (-top if q.narrow_range else -top - 1.0)
    return bottom, top


WEIGHT_RANGES = ("max", "mse")
_MSE_RATIOS = torch.linspace(0.3, 1.0, 71)   # clipping ratios of the max searched by ``mse``


@torch.no_grad()
def set_weight_ranges(model: nn.Module, method: str = "max") -> None:
    """amax of every weight quantizer, per output channel (or per tensor): ``max``, the max
    |w|; ``mse``, the clipped max (0.3 to 1 times it) whose quantized weights are nearest the
    float ones in squared error, which at 4 bits trades a few clipped outliers for a finer
    grid everywhere else."""
    if method not in WEIGHT_RANGES:
        raise ValueError(f"unknown weight range {method!r}; valid: {', '.join(WEIGHT_RANGES)}")
    for module in model.modules():
        q = getattr(module, WEIGHT, None)
        if not isinstance(q, TensorQuantizer) or getattr(module, "weight", None) is None:
            continue
        w = module.weight.detach().float()
        rows = w.reshape(w.shape[0], -1) if q.axis is not None else w.reshape(1, -1)
        amax = rows.abs().amax(dim=1)
        if method == "mse":
            bottom, top = grid_bounds(q)
            candidates = (amax[None, :] * _MSE_RATIOS[:, None]).clamp(min=1e-8)  # ratio, row
            error = torch.empty_like(candidates)
            for i, step in enumerate(candidates[..., None] / top):   # in place: 7x faster
                error[i] = ((rows / step).round_().clamp_(bottom, top).mul_(step).sub_(rows)
                            .square_().sum(-1))
            amax = candidates.gather(0, error.argmin(0, keepdim=True))[0]
        q.amax = (amax.reshape(-1, *[1] * (w.dim() - 1)) if q.axis is not None
                  else amax.reshape(()))


def activation_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: q for n, q in quantizers(model).items()
            if q.is_enabled and not n.endswith(WEIGHT)}


def execution_order(model: nn.Module, example: Any) -> list[str]:
    """Quantized layers in the order one forward pass reaches them."""
    layers = layer_quantizers(model)
    order: list[str] = []
    handles = [module.register_forward_pre_hook(
        lambda _m, _a, name=name: order.append(name) if name not in order else None)
        for name, module in model.named_modules() if name in layers]
    forward_once(model, example, handles)
    return order + [n for n in layers if n not in order]


def has_range(q: TensorQuantizer) -> bool:
    """Whether ``q`` holds a range, i.e. belongs to the quantized model as placed and
    calibrated. A quantizer the placement left off (under ``tensorrt``, a convolution's
    ``output_quantizer``) or that saw no calibration data has none."""
    return q.amax is not None


@contextlib.contextmanager
def layers_enabled(model: nn.Module, names: Iterable[str], enabled: bool) -> Iterator[None]:
    """Enable (or disable) the quantizers of the named layers for the body; every
    quantizer's previous state is restored afterwards, even when the body raises.

    Enabling switches on only the quantizers that hold a range: exactly those the fully
    quantized model uses, never one the placement left off."""
    all_q = quantizers(model)
    saved = {n: q.is_enabled for n, q in all_q.items()}
    owners = {name: [q for q in all_q if q.rsplit(".", 1)[0] == name] for name in names}
    missing = [n for n, qs in owners.items() if not qs]
    if missing:
        raise KeyError(f"no quantized layer named {', '.join(missing)}")
    try:
        for qs in owners.values():
            for q in qs:
                if not enabled:
                    all_q[q].disable()
                elif has_range(all_q[q]):
                    all_q[q].enable()
        yield
    finally:
        for n, q in all_q.items():
            (q.enable if saved[n] else q.disable)()


# --------------------------------------------------------------------------- save / restore
def quant_state(model: nn.Module) -> dict[str, Any]:
    """modelopt's description of the inserted quantizers (plain data; pair it with the
    state dict, which holds the ranges)."""
    return mto.modelopt_state(model)


def folded_layers(model: nn.Module) -> list[list[str]]:
    """The (layer, batch norm) pairs folded by ``equalize``: a checkpoint records them, and
    ``restore_folded`` repeats the folding's structure before its weights are loaded."""
    return [list(p) for p in getattr(model, FOLDED, [])]


def restore_folded(model: nn.Module, pairs: Iterable[Iterable[str]]) -> nn.Module:
    """The structure of a model whose batch norms were folded: each folded batch norm is an
    ``Identity`` and its convolution has a bias (its values come from the state dict)."""
    done = []
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        done.append([conv_name, bn_name])
    if done:
        setattr(model, FOLDED, done)
    return model


def restore_quantized(model: nn.Module, modelopt_state: dict[str, Any],
                      state_dict: dict[str, torch.Tensor], graph_form: str | None = None,
                      folded: Iterable[Iterable[str]] = ()) -> nn.Module:
    """Re-create the quantizers of a saved model on the float ``model`` and load its weights
    and ranges; ``graph_form`` the checkpoint's ``graph`` (``TRACED``: the float model is
    rewritten as it was before quantizers went in), ``folded`` its ``folded`` (the batch norms
    equalization folded, ``folded_layers``). A checkpoint of another architecture is a
    ``CheckpointError``."""
    try:
        model = restore_folded(model, folded)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the quantized checkpoint's folded batch norms do not fit this "
                              f"model ({exc})") from None
    if graph_form == TRACED:
        model, info = _traced(model)
        if "error" in info:
            raise CheckpointError(f"the quantized checkpoint was made from a torch.fx rewrite "
                                  f"of this model, which cannot be traced now ({info['error']})")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # parameter-free quantized modules have no device yet; modelopt prints a count
            warnings.filterwarnings("ignore", message="Could not identify the device")
            model = mto.restore_from_modelopt_state(model, modelopt_state)
    except Exception as exc:
        raise CheckpointError(f"the quantized checkpoint does not fit this model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                              ) from None
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        bad = (missing + unexpected + mismatched)[:3]
        raise CheckpointError(f"the quantized checkpoint does not fit this model "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, "
                              f"{len(mismatched)} mismatched keys, e.g. {', '.join(bad)})")
    model.load_state_dict(state_dict)
    return model
