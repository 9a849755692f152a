"""The adapter to NVIDIA's fake-quant modules (nvidia-modelopt): the only module importing it.

modelopt's API moves between releases; everything the toolkit needs from it is here:
inserting quantizers, turning them on and off by layer, setting ranges, saving and restoring.

Placement follows the deployment target. For TensorRT: conv (and pooling) inputs per tensor,
weights per output channel, and the skip input of each residual add, so TensorRT can fuse the
conv that feeds the add. For onnxruntime, conv outputs are quantized too, since its integer
kernels need a quantized input, weight and output.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
from torch import nn

from .calib import compute_amax
from .config import QuantConfig
from .engine import to_device
from .errors import CheckpointError
from .model import Add, Blend

logger = logging.getLogger(__name__)

WEIGHT = "weight_quantizer"


class QuantAdd(Add):
    """``x + q(skip)``: the skip input carries the quantizer (NVIDIA's TensorRT placement)."""

    def _setup(self) -> None:
        self.skip_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.skip_quantizer(skip)


class QuantBlend(Blend):
    """``(1 - gate) * q(x) + gate * q(y)``; the gate stays in float (a sigmoid output)."""

    def _setup(self) -> None:
        self.x_quantizer = TensorQuantizer()
        self.y_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return super().forward(self.x_quantizer(x), self.y_quantizer(y), gate)


# modelopt warns, per quantized class, that it has no tensor-parallel state under torchrun;
# this project uses data parallelism only.
warnings.filterwarnings("ignore", message="Distributed training is initialized but no "
                        "parallel_state")

for _original, _quantized in ((Add, QuantAdd), (Blend, QuantBlend)):
    if _original not in QuantModuleRegistry:
        mtq.register(original_cls=_original, quantized_cls=_quantized)


def _quant_cfg(qcfg: QuantConfig, target: str) -> dict[str, Any]:
    act = {"num_bits": qcfg.act_bits, "axis": None, "pass_through_bwd": False}
    weight = {"num_bits": qcfg.weight_bits, "axis": 0 if qcfg.per_channel else None,
              "pass_through_bwd": False}
    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": f"*{WEIGHT}", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "cfg": act},
    ]
    if qcfg.residual:
        entries += [{"quantizer_name": f"*{n}", "cfg": act}
                    for n in ("skip_quantizer", "x_quantizer", "y_quantizer")]
    if target == "onnxruntime":
        entries.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d",
                        "cfg": act})
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


def insert_quantizers(model: nn.Module, qcfg: QuantConfig, target: str = "tensorrt") -> nn.Module:
    """Replace supported modules by their fake-quant twins in place, ranges not yet set.

    Weight ranges are set at once (per-channel max); activation ranges come from
    ``calibrate`` or from training. Layers in ``qcfg.exclude`` keep their quantizers disabled.
    """
    model = mtq.quantize(model, _quant_cfg(qcfg, target), forward_loop=None)
    layers = layer_quantizers(model)
    excluded = match_layers(layers, qcfg.exclude)
    unknown = [p for p in qcfg.exclude if not match_layers(layers, [p])]
    if unknown:
        raise ValueError(f"quant.exclude: {', '.join(unknown)} match no quantized layer")
    for name in excluded:
        for q in layers[name].values():
            q.disable()
    set_weight_ranges(model)
    logger.info("quantizers: %d enabled in %d layers (%d layers excluded)",
                sum(q.is_enabled for q in quantizers(model).values()),
                len(layers) - len(excluded), len(excluded))
    return model


@torch.no_grad()
def set_weight_ranges(model: nn.Module) -> None:
    """amax of every weight quantizer: the max |w| per output channel (or per tensor)."""
    for module in model.modules():
        q = getattr(module, WEIGHT, None)
        if isinstance(q, TensorQuantizer) and getattr(module, "weight", None) is not None:
            w = module.weight.detach().abs()
            q.amax = (w.amax(dim=tuple(range(1, w.dim())), keepdim=True) if q.axis is not None
                      else w.max())


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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order + [n for n in layers if n not in order]


@contextlib.contextmanager
def layers_enabled(model: nn.Module, names: Iterable[str], enabled: bool) -> Iterator[None]:
    """Enable (or disable) the quantizers of the named layers for the body; every
    quantizer's previous state is restored afterwards, even when the body raises."""
    all_q = quantizers(model)
    saved = {n: q.is_enabled for n, q in all_q.items()}
    owners = {name: [q for q in all_q if q.rsplit(".", 1)[0] == name] for name in names}
    missing = [n for n, qs in owners.items() if not qs]
    if missing:
        raise KeyError(f"no quantized layer named {', '.join(missing)}")
    try:
        for qs in owners.values():
            for q in qs:
                (all_q[q].enable if enabled else all_q[q].disable)()
        yield
    finally:
        for n, q in all_q.items():
            (q.enable if saved[n] else q.disable)()


# --------------------------------------------------------------------------- statistics
@dataclass
class ActivationStats:
    """Histogram of |x| seen by one quantizer: ``counts`` over ``edges`` (bins of equal width
    from 0, grown as larger values arrive) and the exact ``abs_max``."""

    counts: torch.Tensor
    edges: torch.Tensor
    abs_max: float


def _merge_bins(counts: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum every ``factor`` consecutive bins (the last group zero-padded)."""
    padded = torch.nn.functional.pad(counts, (0, (-len(counts)) % factor))
    return padded.view(-1, factor).sum(1)


class _HistogramCollector:
    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self.width: float | None = None
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.abs_max = 0.0
        self.seen = False

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().abs().float()
        self.seen = True
        batch_max = float(x.max()) if x.numel() else 0.0
        if batch_max <= 0.0:            # all zeros: they belong in the first bin
            if self.width is not None:
                self.counts[0] += x.numel()
            return
        if self.width is None:
            self.width = batch_max / self.num_bins
        bins = max(len(self.counts), math.ceil(batch_max / self.width))
        if bins > 2 * self.num_bins:   # keep the histogram small: merge bins by a whole factor
            factor = math.ceil(bins / self.num_bins)
            self.counts = _merge_bins(self.counts, factor)
            self.width *= factor
            bins = max(len(self.counts), math.ceil(batch_max / self.width))
        hist = torch.histc(x, bins=bins, min=0.0, max=bins * self.width).double().cpu()
        hist[: len(self.counts)] += self.counts
        self.counts, self.abs_max = hist, max(self.abs_max, batch_max)

    def stats(self) -> ActivationStats | None:
        if self.width is None:
            return None
        edges = torch.arange(len(self.counts) + 1, dtype=torch.float64) * self.width
        return ActivationStats(self.counts, edges, self.abs_max)


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable, device: torch.device,
                  num_batches: int | None = None, num_bins: int = 2048
                  ) -> dict[str, ActivationStats | None]:
    """Run up to ``num_batches`` batches in float (quantization off) and histogram the input of
    every enabled activation quantizer. ``None`` marks a quantizer that saw no non-zero data."""
    targets = activation_quantizers(model)
    collectors = {n: _HistogramCollector(num_bins) for n in targets}
    handles = [q.register_forward_pre_hook(collectors[n]) for n, q in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for q in targets.values():
            q.disable_quant()
        for i, (inputs, _targets) in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            model(to_device(inputs, device))
    finally:
        for q in targets.values():
            q.enable_quant()
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: c.stats() for n, c in collectors.items()}


def apply_ranges(model: nn.Module, stats: dict[str, ActivationStats | None], method: str,
                 percentile: float = 99.99) -> list[str]:
    """Set every activation quantizer's amax by ``method``. Quantizers without data are
    disabled (kept float) and returned by name, never given a zero or NaN range."""
    targets = quantizers(model)
    uncalibrated = []
    for name, stat in stats.items():
        q = targets[name]
        amax = None if stat is None else compute_amax(
            method, stat.counts, stat.edges, stat.abs_max, q.num_bits, bool(q.unsigned),
            percentile)
        if amax is None or not math.isfinite(amax) or amax <= 0:
            q.disable()
            uncalibrated.append(name)
        else:
            q.enable()
            q.amax = torch.tensor(amax, dtype=torch.float32)
    if uncalibrated:
        logger.warning("%d quantizers saw no data and stay float: %s", len(uncalibrated),
                       ", ".join(uncalibrated[:5]) + (" ..." if len(uncalibrated) > 5 else ""))
    return uncalibrated


# --------------------------------------------------------------------------- save / restore
def quant_state(model: nn.Module) -> dict[str, Any]:
    """modelopt's description of the inserted quantizers (plain data; pair it with the
    state dict, which holds the ranges)."""
    return mto.modelopt_state(model)


def restore_quantized(model: nn.Module, modelopt_state: dict[str, Any],
                      state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Re-create the quantizers of a saved model on the float ``model`` and load its weights
    and ranges. A checkpoint of another architecture is a ``CheckpointError``."""
    try:
        with warnings.catch_warnings():   # parameter-free quantized modules have no device yet
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


def merge_stats(stats: dict[str, ActivationStats | None]) -> dict[str, ActivationStats | None]:
    """Sum statistics over all processes of the default group (no-op when not distributed).

    Ranks grow their histograms independently, so each rank's counts are moved onto a common
    grid (the widest range seen by any rank, ``len`` bins of the finest width that covers it)
    before summing; a count moves by less than one bin of the common grid.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    names = sorted(stats)
    local = torch.tensor([[s.abs_max if s else 0.0, float(s.edges[-1]) if s else 0.0,
                           len(s.counts) if s else 0] for s in (stats[n] for n in names)],
                         dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)                       # (ranks, quantizers, 3)
    merged: dict[str, ActivationStats | None] = {}
    for i, name in enumerate(names):
        abs_max = float(table[:, i, 0].max())
        top = float(table[:, i, 1].max())
        bins = int(table[:, i, 2].max())
        counts = torch.zeros(max(bins, 1), dtype=torch.float64)
        s = stats[name]
        if s is not None and top > 0:
            centers = (s.edges[1:] + s.edges[:-1]) / 2
            index = torch.clamp((centers / (top / bins)).long(), max=bins - 1)
            counts.index_add_(0, index, s.counts)
        dist.all_reduce(counts)
        merged[name] = None if top <= 0 else ActivationStats(
            counts, torch.arange(bins + 1, dtype=torch.float64) * (top / bins), abs_max)
    return merged


# --------------------------------------------------------------------------- QAT ranges
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
