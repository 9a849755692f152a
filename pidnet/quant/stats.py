"""Activation statistics: histograms collected once, ranges set from them by any method."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..calib import compute_amax
from ..engine import to_device
from ..errors import NonFiniteError
from ..batches import call_model
from ..finite import first_nonfinite_layer
from .modules import activation_quantizers, quantizers

logger = logging.getLogger(__name__)


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


# torch.histc counts in the input's dtype: float32 stops at 2^24 per bin (20M zeros counted
# as 16,777,216). A chunk of at most 2^24 elements cannot reach that, so counts summed over
# chunks in float64 are exact at any resolution, at histc's own speed.
_EXACT_CHUNK = 2 ** 24


def exact_histogram(x: torch.Tensor, bins: int, top: float) -> torch.Tensor:
    """Counts of ``x`` in ``bins`` equal bins over [0, ``top``] (float64 on the CPU), exact
    for any number of elements."""
    counts = torch.zeros(bins, dtype=torch.float64)
    for chunk in x.reshape(-1).split(_EXACT_CHUNK):
        counts += torch.histc(chunk, bins=bins, min=0.0, max=top).double().cpu()
    return counts


class _NonFiniteInput(Exception):
    """A quantizer met a NaN or an Inf (raised inside the forward, caught by
    ``collect_stats``)."""


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
        if not math.isfinite(batch_max):
            raise _NonFiniteInput
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
        hist = exact_histogram(x, bins, bins * self.width)
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
    every enabled activation quantizer. ``None`` marks a quantizer that saw no non-zero data.
    A NaN or an Inf stops it with a ``NonFiniteError`` naming the layer that produced it."""
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
            inputs = to_device(inputs, device)
            try:
                call_model(model, inputs)
            except _NonFiniteInput:
                for h in handles:          # the diagnosing pass runs without the collectors
                    h.remove()
                where = first_nonfinite_layer(model, inputs)
                raise NonFiniteError(f"non-finite activations in calib batch {i} while "
                                     f"collecting statistics: they start at {where}; check "
                                     "that layer's weights and the data") from None
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
