"""Ranges during QAT: tracked by moving average (``stats``) or learned by gradient (LSQ)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from ..batches import call_model
from .modules import WEIGHT, activation_quantizers, grid_bounds, quantizers, set_weight_ranges

RANGE_INITS = ("lsq", "fixed")   # how learned ranges start (train.py resolves qat.direct_init)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RangeTracker:
    """``stats`` mode: during training, every activation quantizer's amax follows the data by
    an exponential moving average of the batch's max |x| times a ratio, until ``freeze()``.

    Under torchrun the batch max is the max over every rank's batch (reduced at each
    quantizer, every step), so every rank tracks the same ranges, those of the data all ranks
    saw, and learns the same ratios: N ranks track as one process would on their combined
    batch (DDP's buffer broadcast from rank 0 then changes nothing).

    ``ratios`` maps quantizer names to that ratio (1: the raw max). A quantizer without one
    keeps its starting range for its first ``warmup`` training batches and takes
    ``amax / mean(batch max)`` over them: a tighter start (a percentile, mse or entropy range)
    keeps its relation to the batch max of the quantized network being trained, whose maxima
    can differ a lot from the float statistics at low bit widths. ``ratios`` is filled in
    place: keep it with the checkpoint to resume.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.9,
                 ratios: dict[str, float] | None = None, warmup: int = 10) -> None:
        self.momentum = momentum
        self.warmup = warmup
        self.frozen = False
        self.ratios = ratios if ratios is not None else {}
        self._seen: dict[str, list[float]] = {}
        self._handles = [q.register_forward_pre_hook(self._updater(name))
                         for name, q in activation_quantizers(model).items()]

    def _updater(self, name: str):
        @torch.no_grad()
        def update(q: TensorQuantizer, args: tuple) -> None:
            if self.frozen or not q.training or q.amax is None:
                return
            batch_max = args[0].detach().abs().max().to(q.amax)
            if _distributed():   # every rank tracks the max over all ranks' batches
                dist.all_reduce(batch_max, op=dist.ReduceOp.MAX)
            if batch_max <= 0:
                return
            if name not in self.ratios:
                seen = self._seen.setdefault(name, [])
                seen.append(float(batch_max))
                if len(seen) >= self.warmup:
                    self.ratios[name] = float(q.amax) / (sum(seen) / len(seen))
                return
            q.amax = (self.momentum * q.amax
                      + (1 - self.momentum) * batch_max * self.ratios[name])
        return update

    def freeze(self) -> None:
        self.frozen = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def track_weight_ranges(model: nn.Module, method: str = "max"
                        ) -> torch.utils.hooks.RemovableHandle:
    """Weight ranges that follow the weights: before every forward of ``model`` (training and
    evaluation alike, so a checkpoint's ranges are its weights'), every weight quantizer's
    amax is set from the current weights by ``method`` (``set_weight_ranges``). Fixed ranges
    clip a weight that grows past its channel's starting max; these grow with it. Remove the
    returned handle to stop."""
    return model.register_forward_pre_hook(lambda m, _args: set_weight_ranges(m, method))


class _Step:
    """A quantizer's learnable step size, held outside its state dict (the state dict keeps
    the static ``_amax`` buffer, so checkpoints load into plain quantizers).

    ``per_sample``: activations count the elements of one sample (LSQ's N_F, the features of a
    layer); weights count the elements that share one step (N_W, per output channel).
    ``pending``: the step is set by LSQ's initialisation from the first tensor it quantizes.
    """

    def __init__(self, param: nn.Parameter, per_sample: bool, pending: bool) -> None:
        self.param = param
        self.per_sample = per_sample
        self.pending = pending


def lsq_grad_scale(x: torch.Tensor, steps: int, top: float, per_sample: bool) -> float:
    """LSQ's gradient scale 1 / sqrt(N * Q_P) for one step size (Esser et al. 2020, sec. 2.2)."""
    count = x[0].numel() if per_sample and x.dim() > 1 else x.numel() // steps
    return 1.0 / math.sqrt(count * top)


class LearnedRangeQuantizer(TensorQuantizer):
    """A TensorQuantizer whose step size is learned by gradient (LSQ, Esser et al. 2020).

    The parameter is the step ``amax / top`` (per tensor, or per output channel for weights);
    its gradient is scaled by ``lsq_grad_scale`` so it learns at the rate of the weights. The
    input gets the clipped straight-through gradient; the quantization grid is modelopt's
    (scale ``top / amax``, same bounds). The static ``_amax`` buffer mirrors the step, so
    export and checkpoints see a plain quantizer.
    """

    _range: _Step
    # the learned parameter lives in the optimizer, not in modelopt's saved state
    _skip_properties_for_save_restore = TensorQuantizer._skip_properties_for_save_restore | {
        "_range"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled or not self._if_quant:
            return super().forward(x)
        bottom, top = grid_bounds(self)
        step = self._range.param
        if self._range.pending:   # LSQ's start: 2 mean|x| / sqrt(Q_P)
            with torch.no_grad():
                dims = tuple(range(1, x.dim())) if step.dim() else tuple(range(x.dim()))
                mean = x.detach().abs().mean(dim=dims, keepdim=bool(step.dim()))
                step.copy_((2 * mean / math.sqrt(top)).reshape(step.shape).clamp(min=1e-8))
            self._range.pending = False
        step = step.abs().clamp(min=1e-8)
        with torch.no_grad():
            self._amax.copy_((step.detach() * top).reshape(self._amax.shape))
        scale = lsq_grad_scale(x, step.numel(), top, self._range.per_sample)
        step = (step - step * scale).detach() + step * scale
        v = torch.clamp(x / step, bottom, top)
        v = (torch.round(v) - v).detach() + v
        return v * step


def make_ranges_learnable(model: nn.Module, init: str = "fixed", init_amax: float = 4.0,
                          activations: bool = True, weights: bool = False
                          ) -> list[nn.Parameter]:
    """Make the enabled activation quantizers (and, with ``weights``, the weight quantizers)
    learn their step sizes; returns the new parameters.

    ``init="fixed"``: ranges already set are kept (e.g. on resume, or calibrated ones) and an
    activation without one starts at ``init_amax`` (no data). ``init="lsq"``: every learned
    activation step starts from the first tensor it quantizes (LSQ's ``2 mean|x| /
    sqrt(Q_P)``). Weight steps always start from the range already set (``quant.
    weight_range``): LSQ's start is about 18 standard deviations of the weights at 8 bits, a
    grid about 5x coarser than their max.
    """
    if init not in RANGE_INITS:
        raise ValueError(f"unknown range init {init!r}; valid: {', '.join(RANGE_INITS)}")
    chosen = dict(sorted(activation_quantizers(model).items())) if activations else {}
    if weights:
        chosen.update(sorted((n, q) for n, q in quantizers(model).items()
                             if n.endswith(WEIGHT) and q.is_enabled))
    params = []
    for name, q in chosen.items():
        if q.amax is None:
            q.amax = torch.tensor(init_amax)
        top = grid_bounds(q)[1]
        amax = q.amax.detach().clone().float()
        param = nn.Parameter(amax.reshape(()) / top if amax.numel() == 1 else amax / top)
        q.__class__ = LearnedRangeQuantizer
        weight = name.endswith(WEIGHT)
        q._range = _Step(param, per_sample=not weight, pending=init == "lsq" and not weight)
        params.append(param)
    return params


def start_learned_ranges(model: nn.Module, inputs: torch.Tensor) -> None:
    """Run LSQ's initialisation on one batch (eval mode, no gradient), so every pending step
    starts from the data each quantizer sees with the ranges before it already set."""
    was_training = model.training
    with torch.no_grad():
        call_model(model.eval(), inputs)
    model.train(was_training)
    pending = [n for n, q in quantizers(model).items()
               if isinstance(q, LearnedRangeQuantizer) and q._range.pending]
    if pending:
        raise RuntimeError(f"LSQ init: {len(pending)} quantizers saw no data, e.g. {pending[0]}")


def mirror_learned_ranges(model: nn.Module) -> None:
    """Copy every learned step into its quantizer's ``amax`` (what checkpoints store)."""
    for q in quantizers(model).values():
        if isinstance(q, LearnedRangeQuantizer):
            q.amax = (q._range.param.detach().abs().clamp(min=1e-8) * grid_bounds(q)[1]
                      ).reshape(q.amax.shape)


def make_ranges_static(model: nn.Module) -> None:
    """Turn learned ranges back into plain quantizers holding the learned amax."""
    mirror_learned_ranges(model)
    for q in quantizers(model).values():
        if isinstance(q, LearnedRangeQuantizer):
            del q._range
            q.__class__ = TensorQuantizer
