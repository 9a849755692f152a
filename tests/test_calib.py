"""amax methods against independent references on known distributions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pidnet.calib import amax_entropy, amax_mse, amax_percentile, compute_amax


def _histogram(x: torch.Tensor, bins: int):
    top = float(x.max())
    return torch.histc(x, bins=bins, min=0, max=top).double(), torch.linspace(0, top, bins + 1)


SAMPLES = {
    "relu_normal": lambda g: torch.relu(torch.randn(100_000, generator=g)),
    "abs_laplace": lambda g: (torch.rand(100_000, generator=g).log() * -1.0),
    "uniform": lambda g: torch.rand(100_000, generator=g) * 3,
}


@pytest.mark.parametrize("dist", list(SAMPLES))
@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
def test_percentile_of_a_known_sample(dist, pct):
    x = SAMPLES[dist](torch.Generator().manual_seed(0))
    counts, edges = _histogram(x, 2048)
    amax, width = amax_percentile(counts, edges, pct), float(edges[1])
    # the smallest bin edge with at least pct % of the sample at or below it
    assert (x <= amax + 1e-6).double().mean() >= pct / 100
    assert (x <= amax - width - 1e-6).double().mean() < pct / 100
    assert amax == pytest.approx(np.percentile(x.numpy(), pct), abs=0.02)


@pytest.mark.parametrize("dist", list(SAMPLES))
def test_mse_is_the_minimiser_of_quantization_error(dist):
    x = SAMPLES[dist](torch.Generator().manual_seed(1))
    counts, edges = _histogram(x, 512)
    centers = (edges[1:] + edges[:-1]) / 2
    errors = []
    for amax in centers[128:].tolist():   # candidates, fake-quantized by PyTorch itself
        q = torch.fake_quantize_per_tensor_affine(centers, amax / 127, 0, -127, 127)
        errors.append(float(((q - centers) ** 2 * counts).sum()))
    best = centers[128 + int(np.argmin(errors))].item()
    got = amax_mse(counts, edges)
    got_error = errors[int(torch.argmin((centers[128:] - got).abs()))]
    assert got == pytest.approx(best, rel=1e-6) or got_error <= min(errors) * (1 + 1e-9)


def _kl_reference(counts: np.ndarray, num_bits: int = 8, start_bin: int = 128) -> int:
    """TensorRT's entropy calibration, written out literally: returns the threshold bin."""
    bins = counts.astype(np.float64).copy()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    best_i, best_kl = None, np.inf
    for i in range(start_bin, len(bins) + 1):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        group = np.floor(np.arange(i) * nbins / i).astype(int)
        q = np.zeros(i)
        for g in range(nbins):
            members = (group == g) & (bins[:i] > 0)
            if members.any():
                q[members] = bins[:i][members].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = np.inf if np.any(q[mask] == 0) else float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return best_i


@pytest.mark.parametrize("dist", list(SAMPLES))
def test_entropy_matches_the_kl_definition_within_one_bin(dist):
    x = SAMPLES[dist](torch.Generator().manual_seed(2))
    counts, edges = _histogram(x, 400)
    expected = float(edges[_kl_reference(counts.numpy())])
    assert abs(amax_entropy(counts, edges) - expected) <= float(edges[1]) + 1e-6


def test_entropy_clips_a_long_tail_and_max_does_not():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(100_000, generator=g).abs(), torch.tensor([40.0])])
    counts, edges = _histogram(x, 2048)
    assert compute_amax("max", counts, edges, 40.0) == 40.0
    assert compute_amax("entropy", counts, edges, 40.0) < 10.0


def test_unknown_method():
    with pytest.raises(ValueError, match="valid: max, percentile, mse, entropy"):
        compute_amax("minmax", torch.ones(4), torch.arange(5.0), 4.0)
