from __future__ import annotations

import pytest
import torch
from torch import nn

from pidnet import quant
from pidnet.config import QuantConfig
from pidnet.errors import CheckpointError, ConfigError
from pidnet.model import Add, create_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.add = Add()

    def forward(self, x):
        return self.add(self.conv1(x), x)


class TinyNet(nn.Module):
    """conv1 -> relu -> layer1 (a residual block whose conv is also named conv1) -> head;
    ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block())
        self.head = nn.Conv2d(4, 2, 1)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(self.layer1(self.relu(self.conv1(x))))


def _quantized(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return quant.insert_quantizers(TinyNet().eval(), QuantConfig(**overrides))


def _fq(x, amax, levels=127):
    """Hand-written symmetric fake quantization from ``-levels`` to ``levels``; ``amax``
    broadcasts (per tensor or channel)."""
    scale = amax / levels
    return torch.clamp(torch.round(x / scale), -levels, levels) * scale


def test_quantized_net_equals_hand_written_fake_quant():
    model = _quantized()
    x = torch.randn(2, 3, 8, 8)
    stats = quant.collect_stats(model, [(x, None)], torch.device("cpu"))
    assert quant.apply_ranges(model, stats, "max") == ["unused.input_quantizer"]
    with torch.no_grad():
        got = model(x)
        ref = TinyNet()
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if "quantizer" not in k})

        def conv(layer, inp, amax=None):
            w = layer.weight
            w_amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
            inp = inp if amax is None else _fq(inp, amax)
            return nn.functional.conv2d(inp, _fq(w, w_amax), layer.bias, padding=layer.padding)

        # calibration sees float activations through fake-quantized weights
        h_cal = torch.relu(conv(ref.conv1, x))
        amax_x, amax_h = x.abs().max(), h_cal.abs().max()
        amax_y = (conv(ref.layer1[0].conv1, h_cal) + h_cal).abs().max()

        h = torch.relu(conv(ref.conv1, x, amax_x))
        y = conv(ref.layer1[0].conv1, h, amax_h) + _fq(h, amax_h)   # skip input quantized
        expected = conv(ref.head, y, amax_y)
    assert torch.allclose(got, expected, atol=1e-5)


def test_uncalibrated_quantizer_is_reported_and_left_float():
    model = _quantized()
    stats = quant.collect_stats(model, [(torch.randn(1, 3, 8, 8), None)], torch.device("cpu"))
    assert stats["unused.input_quantizer"] is None
    assert quant.apply_ranges(model, stats, "entropy") == ["unused.input_quantizer"]
    assert not model.unused.input_quantizer.is_enabled
    amaxes = [q.amax for n, q in quant.quantizers(model).items() if q.is_enabled]
    assert all(torch.isfinite(a).all() and (a > 0).all() for a in amaxes)


def test_exclusion_by_exact_name_does_not_catch_nested_namesakes():
    model = _quantized(exclude=["conv1"])
    assert not model.conv1.input_quantizer.is_enabled
    assert not model.conv1.weight_quantizer.is_enabled
    assert model.layer1[0].conv1.input_quantizer.is_enabled
    model = _quantized(exclude=["*.conv1"])
    assert model.conv1.input_quantizer.is_enabled
    assert not model.layer1[0].conv1.input_quantizer.is_enabled
    with pytest.raises(ConfigError, match="conv9"):
        _quantized(exclude=["conv9"])


def test_residual_quantizer_is_switchable():
    assert "layer1.0.add" in quant.layer_quantizers(_quantized(residual=True))
    assert "layer1.0.add" not in quant.layer_quantizers(_quantized(residual=False))


def test_execution_order():
    order = quant.execution_order(_quantized(), torch.randn(1, 3, 8, 8))
    assert order == ["conv1", "layer1.0.conv1", "layer1.0.add", "head", "unused"]


def test_context_manager_restores_state_even_after_an_exception():
    model = _quantized()
    before = {n: q.is_enabled for n, q in quant.quantizers(model).items()}
    with pytest.raises(RuntimeError, match="boom"):
        with quant.layers_enabled(model, ["layer1.0.conv1", "head"], enabled=False):
            assert not model.head.input_quantizer.is_enabled
            assert not model.layer1[0].conv1.weight_quantizer.is_enabled
            assert model.conv1.input_quantizer.is_enabled
            raise RuntimeError("boom")
    assert {n: q.is_enabled for n, q in quant.quantizers(model).items()} == before
    with pytest.raises(KeyError, match="nope"):
        with quant.layers_enabled(model, ["nope"], enabled=True):
            pass


def test_save_and_restore_give_identical_outputs():
    torch.manual_seed(0)
    model = quant.insert_quantizers(create_model("pidnet_s", num_classes=3, augment=False).eval(),
                                    QuantConfig(exclude=["final_layer.conv2"]))
    x = torch.randn(1, 3, 64, 64)
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")),
                       "percentile")
    state, weights = quant.quant_state(model), model.state_dict()
    restored = quant.restore_quantized(create_model("pidnet_s", 3, augment=False).eval(), state,
                                       weights)
    assert not restored.final_layer.conv2.input_quantizer.is_enabled
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    with pytest.raises(CheckpointError, match="does not fit"):
        quant.restore_quantized(create_model("pidnet_s", 5, augment=False), state, weights)


@pytest.mark.parametrize("target,output_on", [("tensorrt", False), ("onnxruntime", True)])
def test_enabling_a_layer_switches_on_only_the_quantizers_it_was_placed_with(target, output_on):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = quant.insert_quantizers(TinyNet().eval(), QuantConfig(), target, x)
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")), "max")
    placed = {n for n, q in quant.quantizers(model).items() if q.is_enabled}
    layers = quant.layer_quantizers(model)
    for name in ("conv1", "head"):
        with quant.layers_enabled(model, layers, False):
            with quant.layers_enabled(model, [name], True):
                on = {n for n, q in quant.quantizers(model).items() if q.is_enabled}
        assert on == {n for n in placed if n.rsplit(".", 1)[0] == name}
    # the head's output is quantized only by the onnxruntime placement (integer kernels need
    # it); conv1's is never: its ReLU carries the quantizer there
    assert ("head.output_quantizer" in placed) == output_on
    assert "conv1.output_quantizer" not in placed
    assert ("relu.output_quantizer" in placed) == output_on
    with quant.layers_enabled(model, layers, False):
        with quant.layers_enabled(model, ["conv1"], True):
            assert not model.conv1.output_quantizer.is_enabled
    # the unused layer saw no data: it has no range and is never switched on
    with quant.layers_enabled(model, ["unused"], True):
        assert not model.unused.input_quantizer.is_enabled
        assert model.unused.weight_quantizer.is_enabled


def test_onnxruntime_placement_quantizes_each_tensor_once_at_its_producer():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = quant.insert_quantizers(TinyNet().eval(), QuantConfig(), "onnxruntime", x)
    on = {n for n, q in quant.quantizers(model).items() if q.is_enabled and
          not n.endswith("weight_quantizer")}
    # the model input; the ReLU output (unsigned), read by layer1's conv and the add's skip
    # input; the conv output the add reads; the add's output; the head's output. The unused
    # layer keeps only the input quantizer that calibration will find without data.
    assert on == {"conv1.input_quantizer", "relu.output_quantizer",
                  "layer1.0.conv1.output_quantizer", "layer1.0.add.output_quantizer",
                  "head.output_quantizer", "unused.input_quantizer"}
    assert model.relu.output_quantizer.unsigned
    assert not model.layer1[0].add.output_quantizer.unsigned
    # the placement survives a checkpoint round trip
    quant.apply_ranges(model, quant.collect_stats(model, [(x, None)], torch.device("cpu")), "max")
    restored = quant.restore_quantized(TinyNet().eval(), quant.quant_state(model),
                                       model.state_dict())
    assert restored.relu.output_quantizer.unsigned
    assert {n for n, q in quant.quantizers(restored).items() if q.is_enabled} == {
        n for n, q in quant.quantizers(model).items() if q.is_enabled}
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_gates_start_at_their_known_range_and_direct_keeps_it():
    """Sigmoid gates and their complements lie in [0, 1] by construction: the onnxruntime
    placement gives their quantizers amax 1 before any data, which direct mode's data-free
    start keeps (every other activation starts at direct_init_amax); calibration replaces it."""
    torch.manual_seed(0)
    x = 0.01 * torch.randn(1, 3, 64, 64)   # small: the untrained gates do not saturate
    model = quant.insert_quantizers(create_model("pidnet_s", 8).eval(), QuantConfig(),
                                    "onnxruntime", x)
    preset = {n: float(q.amax) for n, q in quant.activation_quantizers(model).items()
              if q.amax is not None}
    assert preset == {n: 1.0 for n in (
        "dfm.edge.output_quantizer", "dfm.complement.output_quantizer",
        "pag3.attention.output_quantizer", "pag3.blend.complement_quantizer",
        "pag4.attention.output_quantizer", "pag4.blend.complement_quantizer")}
    quant.make_ranges_learnable(model, "fixed", 4.0)
    amax = {n: float(q.amax) for n, q in quant.activation_quantizers(model).items()}
    assert all(amax[n] == (1.0 if n in preset else 4.0) for n in amax) and len(amax) > 100
    net = create_model("pidnet_s", 8).eval()
    seen = []
    hook = net.dfm.edge.register_forward_hook(lambda m, i, out: seen.append(out.abs().max()))
    with torch.no_grad():
        net(x)
    hook.remove()
    calibrated = quant.insert_quantizers(net, QuantConfig(), "onnxruntime", x)
    quant.apply_ranges(calibrated, quant.collect_stats(calibrated, [(x, None)],
                                                       torch.device("cpu")), "max")
    # the data's max replaces the preset bound
    assert float(seen[0]) < 0.99
    assert float(calibrated.dfm.edge.output_quantizer.amax) == pytest.approx(float(seen[0]),
                                                                            rel=1e-3)  # a bin edge
    trt = quant.insert_quantizers(create_model("pidnet_s", 8).eval(), QuantConfig(),
                                  "tensorrt", x)
    assert not trt.dfm.edge.output_quantizer.is_enabled



@pytest.mark.parametrize("bits", [4, 8])
def test_mse_weight_ranges_clip_outliers_and_never_quantize_worse_than_the_max(bits):
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(64, 4, 3))
    with torch.no_grad():
        float_model[0].weight.normal_(0, 0.1)
        float_model[0].weight[0, 0, 0, 0] = 1.0      # channel 0: one outlier, 10 sigma out
    model = quant.insert_quantizers(float_model, QuantConfig(weight_bits=bits,
                                                             weight_range="mse"))
    conv, top = model[0], 2 ** (bits - 1) - 1
    clipped = conv.weight_quantizer.amax.clone()    # set by the insertion, from the config
    quant.set_weight_ranges(model, "max")
    w, peak = conv.weight.detach(), conv.weight_quantizer.amax.clone()
    quant.set_weight_ranges(model, "mse")
    assert torch.equal(conv.weight_quantizer.amax, clipped)
    assert torch.equal(peak.flatten(), w.abs().amax(dim=(1, 2, 3)))
    assert clipped.shape == peak.shape and bool((clipped <= peak).all())
    error = {name: ((_fq(w, amax, top) - w) ** 2).sum(dim=(1, 2, 3))
             for name, amax in (("max", peak), ("mse", clipped))}
    assert bool((error["mse"] <= error["max"] + 1e-12).all())
    if bits == 4:   # a coarse grid: clipping the outlier buys a finer step for 575 weights
        assert float(clipped[0]) < 0.5 * float(peak[0])
        assert float(error["mse"][0]) < 0.7 * float(error["max"][0])
    else:           # a fine grid: the outlier is kept almost whole
        assert float(clipped[0]) > 0.95 * float(peak[0])
    # the symmetric grid, +-(2^(bits-1) - 1)
    assert torch.allclose(conv.weight_quantizer(w), _fq(w, clipped, top), atol=1e-6)
    with pytest.raises(ValueError, match="valid: max, mse"):
        quant.set_weight_ranges(model, "minmax")


def test_exclude_takes_the_layers_the_onnxruntime_placement_quantizes():
    """A sweep under the onnxruntime placement ranks layers such as a ReLU, whose output
    quantizer is off until the placement turns it on: the exclude it prints must be taken."""
    x = torch.randn(1, 3, 8, 8)
    placed = quant.insert_quantizers(TinyNet().eval(), QuantConfig(), "onnxruntime", x)
    assert placed.relu.output_quantizer.is_enabled
    kept = quant.insert_quantizers(TinyNet().eval(), QuantConfig(exclude=["relu"]),
                                   "onnxruntime", x)
    assert not kept.relu.output_quantizer.is_enabled
    with pytest.raises(ConfigError, match="'quant.exclude': relu9 match no quantized layer"):
        quant.insert_quantizers(TinyNet().eval(), QuantConfig(exclude=["relu9"]),
                                "onnxruntime", x)
