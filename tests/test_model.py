from __future__ import annotations

import json

import pytest
import torch

from pidnet.model import VARIANTS, Add, create_model

from .conftest import FIXTURES

OFFICIAL = json.loads((FIXTURES / "pidnet_official_state_dict.json").read_text())["variants"]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("augment", [True, False])
def test_state_dict_matches_official_layout(name, augment):
    model = create_model(name, num_classes=19, augment=augment)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    official = [(k, shape) for k, shape in OFFICIAL[name]["augment" if augment else "inference"]]
    assert ours == official


@pytest.mark.parametrize("name,count", [("pidnet_s", 7_625_715), ("pidnet_m", 28_538_515),
                                        ("pidnet_l", 36_939_571)])
def test_inference_parameter_counts(name, count):
    model = create_model(name, num_classes=19, augment=False)
    assert sum(p.numel() for p in model.parameters()) == count == OFFICIAL[name][
        "inference_parameters"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes(name):
    x = torch.randn(2, 3, 64, 128)
    model = create_model(name, num_classes=5, augment=True).eval()
    with torch.no_grad():
        p, main, boundary = model(x)
    assert p.shape == main.shape == (2, 5, 8, 16)
    assert boundary.shape == (2, 1, 8, 16)
    model = create_model(name, num_classes=5, augment=False).train()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 8, 16)


def test_inference_model_equals_main_head_of_augmented_model():
    torch.manual_seed(0)
    full = create_model("pidnet_s", num_classes=4, augment=True).eval()
    lean = create_model("pidnet_s", num_classes=4, augment=False).eval()
    missing = lean.load_state_dict(full.state_dict(), strict=False)
    assert not missing.missing_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(full(x)[1], lean(x))


def test_merges_are_parameter_free_modules():
    model = create_model("pidnet_s", augment=False)
    adds = [n for n, m in model.named_modules() if isinstance(m, Add)]
    assert "layer1.0.add" in adds and "dfm.add_out" in adds and "spp.add_out" in adds
    assert all(not list(m.parameters()) for m in model.modules() if isinstance(m, Add))


@pytest.mark.parametrize("bad", ["pidnet", "s", "PIDNet_S", "pidnet_xs"])
def test_unknown_variant_names_valid_ones(bad):
    with pytest.raises(ValueError, match="pidnet_s, pidnet_m, pidnet_l"):
        create_model(bad)
