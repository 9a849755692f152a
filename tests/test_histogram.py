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
