"""Post-training steps beyond choosing ranges: cross-layer equalization, AdaRound, bias
correction.

- ``equalize`` (Nagel et al., 2019, "Data-free quantization"): batch norms are folded into the
  convolutions before them, then each pair of layers joined by a ReLU (or by nothing) has its
  channels rescaled so that channel ``i``'s weight range is the same in both, which a
  per-tensor weight grid needs. Function-preserving in float: ReLU(x / s) = ReLU(x) / s.
- ``adaround`` (Nagel et al., 2020): per layer, in execution order, whether each weight rounds
  up or down, learned so that the layer's output on calib batches, with its inputs coming
  through the already-quantized layers before it, is nearest the float model's. The rounded
  weights are written into the layer, on its quantizer's grid, so the same quantizer
  reproduces them exactly: no new module, nothing new in a checkpoint.
- ``correct_bias``: each quantized layer's mean output shift per channel against the float
  model (the layers before it quantized), subtracted through its bias, or through the running
  mean of the batch norm after it.

The float reference is the quantized model itself with every quantizer off, so layer names and
the ``onnxruntime`` rewrite never need matching between two models.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from ..batches import call_model
from ..engine import interactive, progress_bar
from .dataflow import Dataflow, conv_batch_norm_pairs, trace_dataflow
from .export import fold_batch_norms
from .modules import (FOLDED, WEIGHT, _traced, execution_order, folded_layers, grid_bounds,
                      quantizers)

logger = logging.getLogger(__name__)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)   # f(x / s) = f(x) / s for s > 0


# --------------------------------------------------------------------------- equalization
def _in_channel_view(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` seen as (input channel, everything it multiplies), groups included."""
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    return (w.reshape(groups, cout // groups, cin_g, -1).permute(0, 2, 1, 3)
            .reshape(groups * cin_g, -1))


def _scale_in_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    view = w.data.reshape(groups, cout // groups, cin_g, -1)
    view.mul_(scale.reshape(groups, 1, cin_g, 1))


def _single_call(flow: Dataflow, name: str) -> list[str | None] | None:
    calls = flow.producers.get(name, [])
    return calls[0] if len(calls) == 1 else None


def equalization_pairs(model: nn.Module, flow: Dataflow) -> list[tuple[str, str]]:
    """(first, second) layers where ``second`` reads only ``first``'s output through modules
    with f(x / s) = f(x) / s (ReLU, LeakyReLU, Identity), each called once and read by nothing
    else, so scaling ``first``'s output channels by 1/s and ``second``'s input channels by s
    leaves the model's function as it was."""
    modules = dict(model.named_modules())
    pairs = []
    for name, second in modules.items():
        if not isinstance(second, _LAYERS):
            continue
        call = _single_call(flow, name)
        if not call or len(call) != 1 or call[0] is None:
            continue
        node, reader = call[0], name
        while (isinstance(modules.get(node), _HOMOGENEOUS)
               and flow.consumers.get(node, set()) == {reader}):
            upstream = _single_call(flow, node)
            if not upstream or len(upstream) != 1 or upstream[0] is None:
                node = None
                break
            node, reader = upstream[0], node
        first = modules.get(node) if node is not None else None
        if (isinstance(first, _LAYERS) and flow.consumers.get(node, set()) == {reader}
                and _single_call(flow, node) is not None
                and first.weight.shape[0] == _in_channel_view(second).shape[0]):
            pairs.append((node, name))
    return pairs


@torch.no_grad()
def equalize(model: nn.Module, example: Any, sweeps: int = 20) -> dict[str, int]:
    """Fold batch norms, then equalize every pair of ``equalization_pairs``, in place (float
    model, before quantizers go in). ``sweeps`` passes over the pairs let chains settle.
    Returns the counts of folded batch norms and equalized pairs."""
    folded = fold_batch_norms(model, example)
    setattr(model, FOLDED, folded_layers(model) + [list(p) for p in folded])
    # pairs are read off the torch.fx rewrite where it exists: one module per call site, so a
    # ReLU module the model calls in several places joins a pair at each; the rewrite holds
    # the model's own layers, so scaling them there scales the model's
    view, info = _traced(model)
    if "error" in info:
        view = model
    flow = trace_dataflow(view, example)
    modules = dict(view.named_modules())
    pairs = equalization_pairs(view, flow)
    for _ in range(sweeps):
        change = 0.0
        for first_name, second_name in pairs:
            first, second = modules[first_name], modules[second_name]
            r1 = first.weight.detach().reshape(first.weight.shape[0], -1).abs().amax(1)
            r2 = _in_channel_view(second).detach().abs().amax(1)
            scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-30)),
                                torch.ones_like(r1))
            first.weight.data.div_(scale.reshape(-1, *[1] * (first.weight.dim() - 1)))
            if first.bias is not None:
                first.bias.data.div_(scale)
            _scale_in_channels(second, scale)
            change = max(change, float((scale - 1).abs().max()))
        if change < 1e-6:
            break
    logger.info("equalization: %d batch norms folded, %d layer pairs equalized",
                len(folded), len(pairs) if sweeps else 0)
    return {"folded": len(folded), "pairs": len(pairs) if sweeps else 0}


# --------------------------------------------------------------------------- shared passes
class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the pass is not
    needed."""


@contextlib.contextmanager
def _quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every quantizer off for the body (the float model), restored afterwards."""
    qs = quantizers(model)
    saved = {n: q.is_enabled for n, q in qs.items()}
    try:
        for q in qs.values():
            q.disable()
        yield
    finally:
        for n, q in qs.items():
            (q.enable if saved[n] else q.disable)()


def weight_layers(model: nn.Module, example: Any) -> list[str]:
    """Layers with an enabled, calibrated weight quantizer, in execution order."""
    modules = dict(model.named_modules())
    names = []
    for name in execution_order(model, example):
        q = getattr(modules[name], WEIGHT, None)
        if isinstance(q, TensorQuantizer) and q.is_enabled and q.amax is not None:
            names.append(name)
    return names


def _run_until(model: nn.Module, layer: nn.Module, inputs: Iterable[Any],
               on_call: Callable[[int, tuple, torch.Tensor], None]) -> None:
    """Run each input batch until ``layer`` has run, calling ``on_call(batch, args, output)``
    with what it read and made."""
    index = [0]

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        on_call(index[0], args, output)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        for index[0], batch in enumerate(inputs):
            with contextlib.suppress(_Stop):
                call_model(model, batch)
    finally:
        handle.remove()


def _output_rows(layer: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A layer's output as (position, channel): channels last for a linear layer, second
    otherwise."""
    if isinstance(layer, nn.Linear):
        return output.reshape(-1, output.shape[-1])
    return output.movedim(1, -1).reshape(-1, output.shape[1])


def _channel_means(output: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, int]:
    """Sum over every position of each output channel, and the count."""
    flat = _output_rows(layer, output)
    return flat.double().sum(0), flat.shape[0]


def _float_pass(model: nn.Module, layers: list[str], inputs: list[Any],
                on_output: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``inputs`` through ``model`` with every quantizer off (the float model), calling
    ``on_output(name, output)`` once per batch for each of ``layers``: a layer called twice is
    seen at its first call, as ``_run_until`` sees it in the quantized model."""
    modules = dict(model.named_modules())
    seen: set[str] = set()

    def hook(name: str) -> Callable:
        def grab(_m: nn.Module, _a: tuple, output: torch.Tensor) -> None:
            if name not in seen:
                seen.add(name)
                on_output(name, output)
        return grab

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with _quantizers_off(model):
            for batch in inputs:
                seen.clear()
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- bias correction
@torch.no_grad()
def correct_bias(model: nn.Module, inputs: list[Any], example: Any) -> dict[str, float]:
    """Subtract each weight-quantized layer's mean output shift (quantized minus float, per
    channel, over ``inputs``) through its bias, in execution order, so every layer is measured
    with the corrections before it in place. A layer without a bias is corrected through the
    batch norm that reads only its output (its running mean); one with neither is left alone.
    Returns each corrected layer's largest shift before correction."""
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    bn_of = dict(conv_batch_norm_pairs(model, trace_dataflow(model, example,
                                                              skip=TensorQuantizer)))
    layers = weight_layers(model, example)
    sums: dict[str, list] = {n: [0.0, 0] for n in layers}

    def accumulate(name: str, output: torch.Tensor) -> None:
        total, count = _channel_means(output, modules[name])
        sums[name][0] = sums[name][0] + total
        sums[name][1] += count

    _float_pass(model, layers, inputs, accumulate)
    float_means = {n: s[0] / max(s[1], 1) for n, s in sums.items()}
    shifts: dict[str, float] = {}
    skipped = []
    for name in progress_bar(layers, "bias correction"):
        layer = modules[name]
        bn = modules.get(bn_of.get(name, ""))
        if layer.bias is None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            skipped.append(name)
            continue
        acc: list = [0.0, 0]

        def measure(_i: int, _args: tuple, output: torch.Tensor, acc: list = acc,
                    layer: nn.Module = layer) -> None:
            total, count = _channel_means(output, layer)
            acc[0], acc[1] = acc[0] + total, acc[1] + count

        _run_until(model, layer, inputs, measure)
        shift = (acc[0] / max(acc[1], 1) - float_means[name]).float()
        if layer.bias is not None:
            layer.bias.sub_(shift.to(layer.bias))
        else:   # BN(y - d) with running mean m is BN(y) with running mean m + d
            bn.running_mean.add_(shift.to(bn.running_mean))
        shifts[name] = float(shift.abs().max())
        if not interactive():
            logger.info("bias correction %s: largest channel shift %.4g", name, shifts[name])
    if skipped:
        logger.info("bias correction: %d layers without a bias or a batch norm after them left "
                    "as they are (%s)", len(skipped), ", ".join(skipped[:3]))
    model.train(was_training)
    return shifts


# --------------------------------------------------------------------------- AdaRound
@dataclass(frozen=True)
class AdaRoundSettings:
    """AdaRound's optimisation (AIMET's defaults except the iteration count)."""

    iterations: int = 1000
    reg: float = 0.01            # weight of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)   # annealed from the first to the second
    warm_start: float = 0.2      # share of iterations before the regulariser starts
    lr: float = 1e-3             # Adam's learning rate for the rounding variables
    samples: int = 4096          # output positions per layer whose inputs are kept
    batch: int = 512             # positions per iteration


_ZETA, _GAMMA = 1.1, -0.1       # the rectified sigmoid's stretch


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its weight: (position, input features), one row per
    output position (im2col for a convolution)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(layer, nn.Conv2d):
        raise NotImplementedError(type(layer).__name__)
    if layer.padding_mode != "zeros":
        x = F.pad(x, [p for p in reversed(layer._reversed_padding_repeated_twice)],
                  mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding,
                    stride=layer.stride)                     # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _layer_output(layer: nn.Module, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` applied to its ``_patches`` rows with ``weight``: (rows, output channels)."""
    groups = getattr(layer, "groups", 1)
    cout = weight.shape[0]
    w = weight.reshape(groups, cout // groups, -1)                       # (G, out_g, in_g)
    x = rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)          # (G, rows, in_g)
    out = torch.bmm(x, w.transpose(1, 2)).transpose(0, 1).reshape(rows.shape[0], cout)
    return out if layer.bias is None else out + layer.bias


def adaround_layers(model: nn.Module, example: Any) -> list[str]:
    """The layers AdaRound can learn: 2-d convolutions and linear layers with a weight
    quantizer, in execution order."""
    modules = dict(model.named_modules())
    return [n for n in weight_layers(model, example)
            if isinstance(modules[n], (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def _float_targets(model: nn.Module, layers: list[str], inputs: list[Any], samples: int,
                   generator: torch.Generator
                   ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """One float pass (quantizers off): for each layer and batch, the output positions
    AdaRound keeps (an equal share of ``samples`` from every batch, drawn at random), and the
    layer's float output there."""
    modules = dict(model.named_modules())
    share = math.ceil(samples / max(len(inputs), 1))
    picks: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    found: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def grab(name: str, output: torch.Tensor) -> None:
        flat = _output_rows(modules[name], output)
        pick = torch.randperm(flat.shape[0], generator=generator)[:share]
        picks[name].append(pick)
        found[name].append(flat[pick.to(flat.device)].float())

    _float_pass(model, layers, inputs, grab)
    return picks, {n: torch.cat(v) for n, v in found.items()}


def _round_layer(layer: nn.Module, rows: torch.Tensor, target: torch.Tensor,
                 settings: AdaRoundSettings, generator: torch.Generator) -> tuple[float, float]:
    """Learn ``layer``'s rounding on (rows, target), write the rounded weights; returns the
    output error (mean squared) of nearest rounding and of the learned one."""
    q: TensorQuantizer = getattr(layer, WEIGHT)
    bottom, top = grid_bounds(q)
    w = layer.weight.detach()
    step = (q.amax.detach().float() / top).to(w)
    if step.numel() > 1:   # per output channel
        step = step.reshape(-1, *[1] * (w.dim() - 1))
    floor = torch.floor(w / step)
    rest = (w / step - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=settings.lr)

    def weights(soft: torch.Tensor) -> torch.Tensor:
        return torch.clamp(floor + soft, bottom, top) * step

    def error(weight: torch.Tensor) -> float:
        with torch.no_grad():
            return float((_layer_output(layer, rows, weight) - target).square().mean())

    nearest = error(torch.clamp(torch.round(w / step), bottom, top) * step)
    warm = int(settings.warm_start * settings.iterations)
    start_beta, end_beta = settings.beta
    for it in range(settings.iterations):
        pick = torch.randint(rows.shape[0], (min(settings.batch, rows.shape[0]),),
                             generator=generator)
        h = _rectified_sigmoid(v)
        out = _layer_output(layer, rows[pick], weights(h))
        loss = (out - target[pick]).square().sum(1).mean()
        if it >= warm:
            progress = (it - warm) / max(settings.iterations - warm, 1)
            beta = end_beta + (start_beta - end_beta) * (1 - progress)
            loss = loss + settings.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = weights((v >= 0).to(w))
        learned = error(hard)
        if learned > nearest:       # never worse than nearest on the layer's own samples
            hard = torch.clamp(torch.round(w / step), bottom, top) * step
            learned = nearest
        # through the quantizer itself, so that quantizing again reproduces it to the bit
        layer.weight.copy_(q(hard))
    return nearest, learned


def adaround(model: nn.Module, inputs: list[Any], example: Any,
             settings: AdaRoundSettings = AdaRoundSettings(), seed: int = 0
             ) -> dict[str, dict[str, float]]:
    """Learn the rounding of every ``adaround_layers`` layer in execution order, in place: the
    layer's inputs come from the quantized model (the layers before it already rounded), its
    target is the float model's output. Returns, per layer, the output error of nearest and
    of learned rounding and the seconds it took."""
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    layers = adaround_layers(model, example)
    picks, targets = _float_targets(model, layers, inputs, settings.samples, generator)
    report: dict[str, dict[str, float]] = {}
    for name in progress_bar(layers, "AdaRound"):
        start = time.perf_counter()
        layer = modules[name]
        kept: list[torch.Tensor] = []
        input_q = getattr(layer, "input_quantizer", None)

        def keep(i: int, args: tuple, _output: torch.Tensor, layer: nn.Module = layer,
                 input_q: Any = input_q, picked: list = picks[name], kept: list = kept) -> None:
            x = args[0]
            if isinstance(input_q, TensorQuantizer) and input_q.is_enabled:
                x = input_q(x)
            rows = _patches(layer, x.detach())
            kept.append(rows[picked[i].to(rows.device)].float())

        with torch.no_grad():
            _run_until(model, layer, inputs, keep)
        rows = torch.cat(kept)
        with torch.enable_grad():
            nearest, learned = _round_layer(layer, rows, targets[name], settings, generator)
        report[name] = {"nearest": nearest, "adaround": learned,
                        "seconds": time.perf_counter() - start}
        if not interactive():
            logger.info("AdaRound %s: output error %.4g -> %.4g (%.1f s)", name, nearest,
                        learned, report[name]["seconds"])
    model.train(was_training)
    return report
