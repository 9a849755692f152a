"""The PIDNet training criterion, as upstream defines it, with every weight configurable.

total = aux_weight * CE(P head) + main_weight * OHEM(main)           (semantic loss)
      + boundary_weight * class-balanced BCE(boundary head)          (boundary loss)
      + sb_weight * OHEM(main, labels only where sigmoid(boundary) > boundary_threshold)

Unlike upstream, a crop made only of ignore pixels gives a finite (zero) loss.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _masked_mean(values: torch.Tensor, keep: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[keep]``; zero (still attached to the graph) when nothing is kept."""
    if keep.any():
        return values[keep].mean()
    return anchor.sum() * 0.0


class OhemCrossEntropy(nn.Module):
    """Online hard example mining cross-entropy.

    Keeps pixels whose probability for the true class is below ``thresh``, but at least the
    ``min_kept`` hardest ones (as upstream: the threshold is raised to the ``min_kept``-th
    smallest probability).
    """

    def __init__(self, ignore_index: int = 255, thresh: float = 0.9, min_kept: int = 131072,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = max(1, min_kept)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pixel_losses = F.cross_entropy(logits, target, weight=self.weight,
                                       ignore_index=self.ignore_index, reduction="none").flatten()
        valid = target.flatten() != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0
        with torch.no_grad():
            prob = F.softmax(logits, dim=1)
            safe_target = target.masked_fill(target == self.ignore_index, 0)
            true_prob = prob.gather(1, safe_target.unsqueeze(1)).flatten()[valid]
            sorted_prob = true_prob.sort().values
            kth = sorted_prob[min(self.min_kept, sorted_prob.numel() - 1)]
            threshold = torch.clamp(kth, min=self.thresh)
            keep = true_prob < threshold
        return _masked_mean(pixel_losses[valid], keep, logits)


def balanced_boundary_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy where edge and non-edge pixels weigh by the other's frequency."""
    logits = logits.flatten()
    target = target.flatten().to(logits.dtype)
    pos, neg = target == 1, target == 0
    total = pos.sum() + neg.sum()
    if total == 0:
        return logits.sum() * 0.0
    weight = torch.zeros_like(logits)
    weight[pos] = neg.sum() / total
    weight[neg] = pos.sum() / total
    return F.binary_cross_entropy_with_logits(logits, target, weight, reduction="mean")


class PIDNetLoss(nn.Module):
    """Criterion for PIDNet's ``[p_head, main, boundary_head]`` outputs.

    Targets are ``{'label': (N,H,W) long, 'boundary': (N,H,W) float}``. A single tensor output
    (a model built with ``augment=False``, or any single-output model) gets plain cross-entropy
    on ``targets['label']`` (or on ``targets`` itself when it is a tensor).
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, main_weight: float = 1.0, use_ohem: bool = True,
                 ohem_thresh: float = 0.9, ohem_min_kept: int = 131072,
                 boundary_weight: float = 20.0, boundary_threshold: float = 0.8,
                 sb_weight: float = 1.0) -> None:
        super().__init__()
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", weight, persistent=False)
        self.aux_weight, self.main_weight = aux_weight, main_weight
        self.boundary_weight, self.boundary_threshold = boundary_weight, boundary_threshold
        self.sb_weight = sb_weight
        self.main_loss: nn.Module = (
            OhemCrossEntropy(ignore_index, ohem_thresh, ohem_min_kept, weight) if use_ohem
            else _CrossEntropy(ignore_index, weight))

    def _ce(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        valid = label != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, label, weight=self.class_weights,
                               ignore_index=self.ignore_index)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor],
                targets: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
        label = targets["label"] if isinstance(targets, Mapping) else targets
        size = (label.shape[-2], label.shape[-1])
        if isinstance(outputs, torch.Tensor):
            return self._ce(_upsample(outputs, size), label)
        if len(outputs) != 3:
            raise ValueError(f"PIDNetLoss expects [p, main, boundary], got {len(outputs)} outputs")
        p_logits, main_logits, bd_logits = (_upsample(o, size) for o in outputs)
        loss = self.aux_weight * self._ce(p_logits, label)
        loss = loss + self.main_weight * self.main_loss(main_logits, label)
        if isinstance(targets, Mapping) and "boundary" in targets:
            loss = loss + self.boundary_weight * balanced_boundary_bce(bd_logits,
                                                                       targets["boundary"])
        on_edge = torch.sigmoid(bd_logits[:, 0]) > self.boundary_threshold
        edge_label = torch.where(on_edge, label, torch.full_like(label, self.ignore_index))
        return loss + self.sb_weight * self.main_loss(main_logits, edge_label)


class _CrossEntropy(nn.Module):
    def __init__(self, ignore_index: int, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)
