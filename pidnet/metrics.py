"""Segmentation metrics from a confusion matrix (mIoU as upstream PIDNet computes it)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def predicted_labels(logits: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """The class of each pixel as the metric scores it: logits (N,C,h,w) resized to ``size``
    (bilinear, as upstream PIDNet evaluates), then the argmax over C; (N,C) logits: argmax."""
    if logits.dim() == 4 and tuple(logits.shape[-2:]) != tuple(size):
        logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear",
                                                 align_corners=False)
    return logits.argmax(dim=1)


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: truth, cols: prediction).

    mIoU is in percent and averaged over all classes; a class absent from both truth and
    prediction counts as IoU 0, as upstream does.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` is logits (N,C,h,w), resized to the target, or labels."""
        if prediction.dim() == target.dim() + 1:
            prediction = predicted_labels(prediction, target.shape[-2:])
        prediction, target = prediction.flatten().cpu(), target.flatten().cpu()
        valid = target != self.ignore_index
        index = target[valid] * self.num_classes + prediction[valid]
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes of the default group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            matrix = self.matrix.clone()
            if dist.get_backend() == "nccl":
                matrix = matrix.cuda()
            dist.all_reduce(matrix)
            self.matrix = matrix.cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1]."""
        m = self.matrix.double()
        tp = m.diag()
        return tp / torch.clamp(m.sum(0) + m.sum(1) - tp, min=1.0)

    def compute(self) -> dict[str, float]:
        """``{'miou': %, 'pixel_acc': %}``."""
        m = self.matrix.double()
        return {"miou": 100.0 * self.iou().mean().item(),
                "pixel_acc": 100.0 * (m.diag().sum() / torch.clamp(m.sum(), min=1.0)).item()}
