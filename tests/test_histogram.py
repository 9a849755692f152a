from __future__ import annotations

import torch
from torch import nn

from pidnet import quant
from pidnet.config import QuantConfig


def test_histogram_stays_bounded_and_keeps_every_count():
    model = quant.insert_quantizers(nn.Sequential(nn.Conv2d(1, 1, 1)), QuantConfig())
    batches = [(torch.full((1, 1, 2, 2), v), None) for v in (0.5, 100.0, 3.0)]
    stats = quant.collect_stats(model, batches, torch.device("cpu"), num_bins=64)
    s = stats["0.input_quantizer"]
    assert len(s.counts) <= 2 * 64 and s.counts.sum() == 12
    assert s.abs_max == 100.0 and s.edges[-1] >= 100.0
    widths = s.edges[1:] - s.edges[:-1]
    assert torch.allclose(widths, widths[0].expand_as(widths))


def test_counts_past_float32_integers_are_exact():
    """torch.histc counts in float32, which stops at 2^24 per bin: 2^24 + 100 equal values
    were counted as 16,777,216 per thread counting. At Cityscapes resolution a post-ReLU
    channel map holds more. One thread: histc's float32 count saturates at 2^24 itself."""
    torch.set_num_threads(1)
    n = 2 ** 24 + 100
    model = quant.insert_quantizers(nn.Sequential(nn.Identity(), nn.Conv2d(1, 1, 1)),
                                    QuantConfig())
    batch = torch.ones(1, 1, 1, n)
    stats = quant.collect_stats(model, [(batch, None)], torch.device("cpu"), num_bins=64)
    s = stats["1.input_quantizer"]
    assert s.counts.sum() == n and s.counts.max() == n
    counts = quant.exact_histogram(torch.ones(n), 4, 1.0)
    assert counts.tolist() == [0, 0, 0, n]
