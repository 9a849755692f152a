"""Activation ranges (amax) from a histogram of absolute values: max, percentile, mse, entropy.

Pure tensor math, no modelopt: the statistics are collected once (``pidnet.quant``) and every
method reads the same histogram. ``mse`` and ``entropy`` evaluate all candidate ranges at once
instead of looping over them in Python, and ``mse`` quantizes with the right arguments.

A histogram is ``counts`` (n,) over ``edges`` (n+1,) from 0 to at least the largest |x| seen.
"""
from __future__ import annotations

import torch

METHODS = ("max", "percentile", "mse", "entropy")


def _levels(num_bits: int, unsigned: bool) -> int:
    """Positive quantization levels: 127 for signed INT8, 255 for unsigned."""
    return (1 << num_bits) - 1 if unsigned else (1 << (num_bits - 1)) - 1


def amax_percentile(counts: torch.Tensor, edges: torch.Tensor, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of the values lie."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    counts = counts.double()
    cdf = torch.cumsum(counts, 0) / counts.sum()
    target = torch.tensor([percentile / 100.0], dtype=torch.float64)
    index = int(torch.searchsorted(cdf, target).clamp(max=len(cdf) - 1))
    return float(edges[index + 1])


def quantization_mse(counts: torch.Tensor, edges: torch.Tensor, candidates: torch.Tensor,
                     num_bits: int = 8, unsigned: bool = False) -> torch.Tensor:
    """Histogram-weighted squared error of fake-quantizing the bin centres, per candidate amax."""
    centers = ((edges[1:] + edges[:-1]) / 2).double()
    levels = _levels(num_bits, unsigned)
    scale = candidates.double()[:, None] / levels
    quantized = torch.clamp(torch.round(centers[None, :] / scale), max=levels) * scale
    return ((quantized - centers[None, :]) ** 2 * counts.double()[None, :]).sum(1) / counts.sum()


def amax_mse(counts: torch.Tensor, edges: torch.Tensor, num_bits: int = 8,
             unsigned: bool = False, start_bin: int = 128, chunk: int = 256) -> float:
    """The bin centre (from ``start_bin`` on) whose amax minimises the quantization MSE."""
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = centers[min(start_bin, len(centers) - 1):]
    errors = torch.cat([quantization_mse(counts, edges, candidates[i:i + chunk], num_bits,
                                         unsigned) for i in range(0, len(candidates), chunk)])
    return float(candidates[int(torch.argmin(errors))])


def entropy_divergences(counts: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                        start_bin: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) for every threshold bin ``i`` from ``start_bin`` to ``len(counts)``.

    The TensorRT definition: P is the histogram up to ``i`` with the outliers added to its last
    bin; Q merges those ``i`` bins into ``2^(bits-1)`` groups and spreads each group's count
    evenly over its non-empty bins. As in NVIDIA's calibrators, the first bin takes the second
    bin's count (it mostly holds the zeros after a ReLU). Returns (thresholds, divergences).
    """
    b = counts.double().clone()
    b[0] = b[1]
    n = len(b)
    nbins = 1 << (num_bits - 1 + int(unsigned))
    total = b.sum()
    zero = torch.zeros(1, dtype=torch.float64)
    c_cum = torch.cat([zero, torch.cumsum(b, 0)])                  # C[j] = sum b[:j]
    n_cum = torch.cat([zero, torch.cumsum((b > 0).double(), 0)])   # nonzero bins in b[:j]
    blogb = torch.where(b > 0, b * torch.log(torch.where(b > 0, b, 1.0)), 0.0)
    l_cum = torch.cat([zero, torch.cumsum(blogb, 0)])

    i = torch.arange(max(start_bin, 1), n + 1, dtype=torch.int64)   # thresholds (bins kept)
    k = torch.arange(nbins + 1, dtype=torch.int64)
    # group k covers bins [ceil(k*i/nbins), ceil((k+1)*i/nbins)): bin j -> floor(j*nbins/i)
    bounds = (k[None, :] * i[:, None] + nbins - 1) // nbins          # (T, nbins+1)
    c_group = c_cum[bounds[:, 1:]] - c_cum[bounds[:, :-1]]
    n_group = n_cum[bounds[:, 1:]] - n_cum[bounds[:, :-1]]
    has = n_group > 0
    group_term = torch.where(has, c_group * torch.log(torch.where(has, c_group, 1.0)
                                                      / torch.where(has, n_group, 1.0)), 0.0)

    last = b[i - 1]
    outliers = total - c_cum[i]
    p_last = last + outliers
    g_last = ((i - 1) * nbins) // i
    c_last = c_group.gather(1, g_last[:, None])[:, 0]
    n_last = n_group.gather(1, g_last[:, None])[:, 0]
    kept = c_cum[i]
    plogp = l_cum[i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp(min=1e-300)),
                                       0.0)
    plogq = group_term.sum(1) + torch.where(
        (outliers > 0) & (c_last > 0),
        outliers * torch.log(c_last.clamp(min=1e-300) / n_last.clamp(min=1.0)), 0.0)
    kl = (plogp - plogq - total * torch.log(total) + total * torch.log(kept.clamp(min=1e-300)))
    kl = kl / total
    kl = torch.where((last == 0) & (outliers > 0), torch.full_like(kl, float("inf")), kl)
    kl = torch.where(kept > 0, kl, torch.full_like(kl, float("inf")))
    return i, kl


def amax_entropy(counts: torch.Tensor, edges: torch.Tensor, num_bits: int = 8,
                 unsigned: bool = False, start_bin: int = 128) -> float:
    """The threshold that minimises the KL divergence (the largest one on ties)."""
    thresholds, kl = entropy_divergences(counts, num_bits, unsigned, start_bin)
    best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))
    return float(edges[int(thresholds[best])])


def compute_amax(method: str, counts: torch.Tensor, edges: torch.Tensor, abs_max: float,
                 num_bits: int = 8, unsigned: bool = False, percentile: float = 99.99) -> float:
    """amax of one quantizer by ``method`` from its statistics."""
    if method == "max":
        return abs_max
    if method == "percentile":
        return amax_percentile(counts, edges, percentile)
    if method == "mse":
        return amax_mse(counts, edges, num_bits, unsigned)
    if method == "entropy":
        return amax_entropy(counts, edges, num_bits, unsigned)
    raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
