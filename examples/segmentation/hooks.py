"""A segmentation model the toolkit knows nothing about, as a new user writes its hooks with
nothing but the README: torchvision's LRASPP (MobileNetV3-Large, random weights) segmenting
synthetic shapes. Its loader yields dict batches, its criterion returns a dict of losses, its
forward returns ``{'out': logits}`` and writes its adds, products and resizes as functions;
nothing in here adapts the model to the toolkit (config keys ``batch.inputs`` and
``batch.targets`` name the batch's keys).

``user.size`` (default [64, 64]) sets the image size: ``bench.any_model_speed`` runs it at
256x512."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

NUM_CLASSES = 4


class Shapes(Dataset):
    """A square (class 1), a disc (2) and a bar (3) on a noisy background (0), placed and
    coloured by the index: the same sample for the same index."""

    def __init__(self, length: int, seed: int, size: tuple[int, int]) -> None:
        self.length, self.seed, self.size = length, seed, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        h, w = self.size
        side = min(h, w) // 4   # the square's side, the disc's diameter
        mask = torch.zeros(h, w, dtype=torch.long)
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x0 = int(torch.randint(0, w - side, (1,), generator=g))
        y0 = int(torch.randint(0, h - side, (1,), generator=g))
        mask[y0:y0 + side, x0:x0 + side] = 1
        cx = int(torch.randint(side, w - side, (1,), generator=g))
        cy = int(torch.randint(side, h - side, (1,), generator=g))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < (side // 2) ** 2] = 2
        row = int(torch.randint(0, h - side // 3, (1,), generator=g))
        mask[row:row + side // 3] = 3
        colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2],
                                [0.2, 0.2, 0.9]])
        image = colours[mask].permute(2, 0, 1) + 0.1 * torch.randn(3, h, w, generator=g)
        return {"image": image, "mask": mask}


def get_model(cfg):
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                     num_classes=NUM_CLASSES)


def get_data_loader(cfg, split):
    size = tuple(cfg.user.get("size", (64, 64)))
    length = {"train": 16, "val": 8, "calib": 8, "test": 8}[split]
    seed = {"train": 0, "val": 1, "calib": 0, "test": 2}[split]
    return DataLoader(Shapes(length, seed, size), batch_size=cfg.user.get("batch_size", 4),
                      shuffle=split == "train")


def get_optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9)


def get_criterion(cfg):
    def losses(outputs, mask):
        logits = outputs["out"]
        probs = logits.softmax(1)
        one_hot = F.one_hot(mask, NUM_CLASSES).permute(0, 3, 1, 2).float()
        overlap = (probs * one_hot).sum((0, 2, 3))
        dice = 1 - (2 * overlap / (probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)) + 1)).mean()
        return {"cross_entropy": F.cross_entropy(logits, mask), "dice": dice}
    return losses
