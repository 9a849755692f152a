from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pidnet.losses import OhemCrossEntropy, PIDNetLoss, balanced_boundary_bce
from pidnet.metrics import ConfusionMatrix, predicted_labels


def test_ohem_on_an_all_ignore_crop_is_finite_and_backpropagates():
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), 255)
    loss = OhemCrossEntropy(min_kept=10)(logits, target)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_full_pidnet_loss_on_all_ignore_is_finite():
    outs = [torch.randn(1, 3, 4, 4, requires_grad=True) for _ in range(2)] + [
        torch.randn(1, 1, 4, 4, requires_grad=True)]
    targets = {"label": torch.full((1, 16, 16), 255), "boundary": torch.zeros(1, 16, 16)}
    loss = PIDNetLoss(ohem_min_kept=4)(outs, targets)
    assert torch.isfinite(loss)


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    # pixel i has true-class probability rising with i
    n = 10
    logits = torch.zeros(1, 2, 1, n)
    logits[0, 0, 0] = torch.linspace(-3, 3, n)
    target = torch.zeros(1, 1, n, dtype=torch.long)
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten()
    prob = torch.sigmoid(torch.linspace(-3, 3, n))
    loss = OhemCrossEntropy(thresh=0.5, min_kept=1)(logits, target)
    assert loss.item() == pytest.approx(per_pixel[prob < 0.5].mean().item())
    # min_kept above the count below threshold raises the threshold
    loss = OhemCrossEntropy(thresh=0.1, min_kept=6)(logits, target)
    kth = prob.sort().values[6]
    assert loss.item() == pytest.approx(per_pixel[prob < kth].mean().item())


def test_boundary_bce_balances_classes():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w = torch.tensor([3 / 4, 1 / 4, 1 / 4, 1 / 4])
    expected = (w * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()
    assert balanced_boundary_bce(logits, target).item() == pytest.approx(expected.item())


def test_pidnet_loss_combines_terms_with_configured_weights():
    torch.manual_seed(0)
    p, main = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    bd = torch.full((2, 1, 4, 4), -10.0)            # sigmoid < 0.8 everywhere: no edge term
    label = torch.randint(0, 4, (2, 16, 16))
    boundary = (torch.rand(2, 16, 16) > 0.8).float()
    crit = PIDNetLoss(use_ohem=False, aux_weight=0.4, boundary_weight=20.0)
    up = lambda t: F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False)
    expected = (0.4 * F.cross_entropy(up(p), label) + F.cross_entropy(up(main), label)
                + 20.0 * balanced_boundary_bce(up(bd), boundary))
    got = crit([p, main, bd], {"label": label, "boundary": boundary})
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_single_output_gets_plain_cross_entropy():
    logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    assert PIDNetLoss()(logits, label).item() == pytest.approx(
        F.cross_entropy(logits, label).item())


def test_miou_against_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = ConfusionMatrix(num_classes=4)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # IoU: class0 1/(2+2-1)=1/3, class1 2/(2+3-2)=2/3, class2 0, class3 absent -> 0
    result = cm.compute()
    assert result["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0 + 0) / 4)
    assert result["pixel_acc"] == pytest.approx(100 * 3 / 5)


def test_confusion_matrix_accepts_logits_at_lower_resolution():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0                               # predicts class 1 everywhere
    target = torch.ones(1, 4, 4, dtype=torch.long)
    cm = ConfusionMatrix(2)
    cm.update(logits, target)
    assert cm.compute()["miou"] == pytest.approx(50.0)
    assert math.isclose(cm.compute()["pixel_acc"], 100.0)


def test_predicted_labels_resize_dense_logits_to_the_pixels_scored():
    logits = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]]]])   # 1x2x1x2: class 0 left, 1 right
    labels = predicted_labels(logits, (2, 4))
    assert labels.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]
    assert predicted_labels(logits, (1, 2)).tolist() == [[[0, 1]]]       # already that size
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])           # a classifier's (N, C)
    assert predicted_labels(scores, (2, 4)).tolist() == [1, 0]
