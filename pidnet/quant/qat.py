"""Activation ranges during QAT: tracked by moving average (``stats``) or learned (``direct``)."""
from __future__ import annotations

import math

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from .modules import activation_quantizers, quantizers


class RangeTracker:
    """``stats`` mode: during training, every activation quantizer's amax follows the data by
    an exponential moving average of the batch's max |x|, until ``freeze()``."""

    def __init__(self, model: nn.Module, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.frozen = False
        self._handles = [q.register_forward_pre_hook(self._update)
                         for q in activation_quantizers(model).values()]

    @torch.no_grad()
    def _update(self, q: TensorQuantizer, args: tuple) -> None:
        if self.frozen or not q.training or q.amax is None:
            return
        batch_max = args[0].detach().abs().max().to(q.amax)
        if batch_max > 0:
            q.amax = self.momentum * q.amax + (1 - self.momentum) * batch_max

    def freeze(self) -> None:
        self.frozen = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _bounds(q: TensorQuantizer) -> tuple[float, float]:
    top = 2.0 ** (q.num_bits - 1 + int(bool(q.unsigned))) - 1.0
    bottom = 0.0 if q.unsigned else (-top if q.narrow_range else -top - 1.0)
    return bottom, top


class _RangeRef:
    """Holds a quantizer's learnable amax outside its state dict (the state dict keeps the
    static ``_amax`` buffer, so checkpoints load into plain quantizers)."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param


class LearnedRangeQuantizer(TensorQuantizer):
    """A TensorQuantizer whose per-tensor range is learned by gradient (LSQ, Esser et al. 2020).

    The learned parameter is the step size ``amax / top`` (LSQ's parameterisation, so it
    learns at the rate of the weights); its gradient is scaled by ``1/sqrt(numel * top)``.
    The input gets the clipped straight-through gradient, and the fake quantization is
    modelopt's (scale ``top / amax``, same bounds). The static ``_amax`` buffer mirrors the
    learned value, so export and checkpoints see a plain quantizer.
    """

    _range: _RangeRef
    # the learned parameter lives in the optimizer, not in modelopt's saved state
    _skip_properties_for_save_restore = TensorQuantizer._skip_properties_for_save_restore | {
        "_range"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled or not self._if_quant:
            return super().forward(x)
        bottom, top = _bounds(self)
        step = self._range.param.abs().clamp(min=1e-6)
        with torch.no_grad():
            self._amax.copy_((step.detach() * top).reshape(self._amax.shape))
        grad_scale = 1.0 / math.sqrt(x.numel() * top)
        step = (step - step * grad_scale).detach() + step * grad_scale
        v = torch.clamp(x / step, bottom, top)
        v = (torch.round(v) - v).detach() + v
        return v * step


def make_ranges_learnable(model: nn.Module, init_amax: float) -> list[nn.Parameter]:
    """``direct`` mode: every enabled activation quantizer learns its range. Ranges already
    set (e.g. on resume) are kept; others start at ``init_amax`` (no data needed)."""
    params = []
    for _name, q in sorted(activation_quantizers(model).items()):
        if q.amax is None:
            q.amax = torch.tensor(init_amax)
        top = _bounds(q)[1]
        param = nn.Parameter(q.amax.detach().clone().reshape(()).float() / top)
        q.__class__ = LearnedRangeQuantizer
        q._range = _RangeRef(param)
        params.append(param)
    return params


def make_ranges_static(model: nn.Module) -> None:
    """Turn learned ranges back into plain quantizers holding the learned amax."""
    for q in quantizers(model).values():
        if isinstance(q, LearnedRangeQuantizer):
            q.amax = q._range.param.detach().abs().clamp(min=1e-6) * _bounds(q)[1]
            del q._range
            q.__class__ = TensorQuantizer
