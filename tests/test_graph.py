"""Functional ops made modules and one quantizer per call site (``quant.graph``), for the
onnxruntime placement: what torchvision-style models need to run integer."""
from __future__ import annotations

import collections
import json
import logging

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from pidnet import quant
from pidnet.calibrate import main as calibrate_main
from pidnet.checkpoint import read_checkpoint
from pidnet.config import QuantConfig, load_config
from pidnet.export_onnx import main as export_main
from pidnet.hooks import load_hooks
from pidnet.model import create_model
from pidnet.pipeline import Session, load_quantized

from .helpers import ROOT, tiny_config

FUNCTIONAL_HOOKS = str(ROOT / "tests" / "fixtures" / "functional_hooks.py")


def _calls(model: nn.Module, x: torch.Tensor, kind: type) -> collections.Counter:
    """How often each enabled module of ``kind`` runs in one forward pass."""
    calls: collections.Counter = collections.Counter()
    handles = [m.register_forward_hook(lambda _m, _a, _o, n=n: calls.update([n]))
               for n, m in model.named_modules()
               if isinstance(m, kind) and getattr(m, "is_enabled", True)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return calls


def test_every_call_site_has_its_own_quantizer():
    torch.manual_seed(0)
    model = create_model("pidnet_s", 4, augment=False)
    x = torch.randn(1, 3, 64, 64)
    shared = _calls(model, x, nn.ReLU)
    assert shared["relu"] == 8 and shared["layer1.0.relu"] == 2   # PIDNet's own sharing
    with torch.no_grad():
        reference = model.eval()(x)
    qmodel = quant.insert_quantizers(model, QuantConfig(), "onnxruntime", x)
    calls = _calls(qmodel, x, TensorQuantizer)
    assert len(calls) > 120 and set(calls.values()) == {1}
    names = set(dict(qmodel.named_modules()))
    assert {"relu", "relu_1", "relu_7", "layer1.0.relu_1"} <= names
    # the same float function, and the same weights under the same names
    quant.disable_all(qmodel)
    with torch.no_grad():
        assert torch.allclose(qmodel(x), reference, atol=1e-5)
    assert set(model.state_dict()) <= set(qmodel.state_dict())


def test_functional_ops_run_integer_and_restore_from_the_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path, hooks=FUNCTIONAL_HOOKS, user={}, model_path=None,
                      calib={"num_batches": 2, "methods": ["max"]},
                      export={"target": "onnxruntime", "latency_runs": 3})
    assert calibrate_main(["--config", str(cfg), "--set", f"output_dir={tmp_path / 'cal'}"]) == 0
    # add, hardsigmoid, product, hardswish, sigmoid, product, concatenation, resize
    assert "8 functional ops made modules, 1 call sites" in capsys.readouterr().err
    checkpoint = tmp_path / "cal" / "quantized.pt"
    # the checkpoint restores the rewritten model: every range back where it was
    saved = read_checkpoint(checkpoint)
    assert saved["graph"] == "traced"
    session = Session(load_config(str(cfg)), tmp_path, load_hooks(FUNCTIONAL_HOOKS),
                      torch.device("cpu"))
    restored = load_quantized(session, checkpoint)
    restored_state = restored.state_dict()
    assert set(restored_state) == set(saved["model"])
    assert all(torch.equal(restored_state[k], v) for k, v in saved["model"].items()
               if k.endswith("_amax"))
    assert export_main(["--config", str(cfg), "--set", f"model_path={checkpoint}",
                        "--set", f"output_dir={tmp_path / 'export'}"]) == 0
    graph = json.loads((tmp_path / "export" / "results.json").read_text())[
        "optimized_int8_graph"]
    # 4 convolutions, the residual add, both products, the sigmoid and the concatenation;
    # hardswish as x * hardsigmoid(x) with the gate quantized (onnxruntime has no integer
    # HardSwish; its own quantize_static does the same): a third integer product; both hard
    # sigmoids, their unsigned [0, 1] gates clipping them, as depthwise convolutions
    assert graph["integer_convs"] == graph["all_convs"] == 6
    assert graph["integer"] == {"QLinearConv": 6, "QLinearAdd": 1, "QLinearMul": 3,
                                "QLinearSigmoid": 1, "QLinearConcat": 1}
    assert graph["float"] == {} and graph["float_nodes"] == {}


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:                       # data-dependent: torch.fx cannot trace it
            x = self.relu(self.conv(x))
        return self.relu(x + 1)


def test_a_model_fx_cannot_trace_keeps_its_modules_and_says_so(caplog):
    model = _Branchy()
    x = torch.rand(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING):
        qmodel = quant.insert_quantizers(model, QuantConfig(), "onnxruntime", x)
    assert qmodel is model and type(qmodel) is _Branchy
    assert "torch.fx cannot rewrite _Branchy" in caplog.text
    assert quant.graph_form(qmodel) is None
    assert _calls(qmodel, x, TensorQuantizer)["relu.output_quantizer"] == 2
