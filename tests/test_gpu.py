"""GPU checks (skipped without CUDA): modelopt's CUDA fake-quant path agrees with the CPU path,
and a QAT step with learned ranges runs on the device."""
from __future__ import annotations

import copy

import pytest
import torch

from pidnet import quant
from pidnet.config import QuantConfig
from pidnet.model import create_model

pytestmark = pytest.mark.gpu


def _calibrated_pidnet():
    torch.manual_seed(0)
    model = quant.insert_quantizers(create_model("pidnet_s", 4, augment=False).eval(),
                                    QuantConfig())
    x = torch.randn(2, 3, 64, 128)
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")),
                       "entropy")
    return model, x


def test_cuda_fake_quant_matches_cpu():
    model, x = _calibrated_pidnet()
    with torch.no_grad():
        cpu = model(x)
        gpu = copy.deepcopy(model).cuda()(x.cuda()).cpu()
    # rounding ties may differ between the kernels: compare the decisions, not the bits
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() > 0.99
    assert torch.allclose(cpu, gpu, atol=0.1 * cpu.abs().max().item())


def test_learned_range_step_on_cuda():
    model, x = _calibrated_pidnet()
    model = model.cuda().train()
    params = quant.make_ranges_learnable(model, init_amax=4.0)
    model(x.cuda()).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in params)
