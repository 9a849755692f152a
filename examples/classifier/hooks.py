"""The four hooks for a model the toolkit knows nothing about: torchvision's ResNet-18 (or
MobileNetV3-Small) classifying synthetic textures (no download, no data).

Four classes of 3-channel images drawn per index from a seeded generator: horizontal stripes,
vertical stripes, a checkerboard and smooth blobs, each with a random phase, period, colour
and noise. The metric is top-1 accuracy in percent.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pidnet.config import Bounds, Config
from pidnet.errors import ConfigError

RETURNS_TRAINED_MODEL = False     # get_model builds an untrained network: set model_path
USER_DEFAULTS: dict[str, Any] = {"arch": "resnet18", "image_size": 32, "batch_size": 32,
                                 "train_images": 1024, "val_images": 256, "calib_images": 128,
                                 "data_seed": 0}
USER_BOUNDS = {"image_size": Bounds(16), "batch_size": Bounds(1), "train_images": Bounds(1),
               "val_images": Bounds(1), "calib_images": Bounds(1), "data_seed": Bounds(0)}
ARCHS = {"resnet18": torchvision.models.resnet18,
         "mobilenet_v3_small": torchvision.models.mobilenet_v3_small}
CLASSES = ("horizontal", "vertical", "checker", "blobs")


def settings(cfg: Config) -> dict[str, Any]:
    unknown = [k for k in cfg.user if k not in USER_DEFAULTS]
    if unknown:
        raise ConfigError(f"unknown config key 'user.{unknown[0]}' for the classifier hooks; "
                          f"valid keys: {', '.join(USER_DEFAULTS)}")
    user = {**USER_DEFAULTS, **cfg.user}
    if user["arch"] not in ARCHS:
        raise ConfigError(f"config key 'user.arch' must be one of {', '.join(ARCHS)}, "
                          f"got {user['arch']!r}")
    for key, bounds in USER_BOUNDS.items():
        if not isinstance(user[key], int) or isinstance(user[key], bool):
            raise ConfigError(f"config key 'user.{key}' must be an integer, got {user[key]!r}")
        bounds.check(f"user.{key}", user[key])
    return user


def check_config(cfg: Config) -> None:
    settings(cfg)


class Textures(Dataset):
    """Deterministic per (seed, index): the same image every time it is drawn."""

    def __init__(self, length: int, size: int, seed: int) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % len(CLASSES)
        n = self.size
        y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32),
                              torch.arange(n, dtype=torch.float32), indexing="ij")
        period = 3 + 6 * torch.rand((), generator=g)
        phase = 2 * math.pi * torch.rand((), generator=g)
        if label == 0:
            pattern = torch.sin(2 * math.pi * y / period + phase)
        elif label == 1:
            pattern = torch.sin(2 * math.pi * x / period + phase)
        elif label == 2:
            pattern = torch.sin(2 * math.pi * x / period + phase) * torch.sin(
                2 * math.pi * y / period + phase)
        else:
            cx, cy = torch.rand(2, generator=g) * n
            pattern = torch.cos(((x - cx) ** 2 + (y - cy) ** 2).sqrt() / (period * 2))
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        image = colour * pattern + 0.3 * torch.randn(3, n, n, generator=g)
        return image, label


def get_model(cfg: Config) -> torch.nn.Module:
    return ARCHS[settings(cfg)["arch"]](weights=None, num_classes=len(CLASSES))


def get_data_loader(cfg: Config, split: str) -> DataLoader:
    user = settings(cfg)
    seed = user["data_seed"] + {"train": 0, "calib": 0, "val": 7919}[split]
    dataset = Textures(user[f"{split}_images"], user["image_size"], seed)
    train = split == "train"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.seed) if distributed else None
    return DataLoader(dataset, batch_size=user["batch_size"], shuffle=train and sampler is None,
                      sampler=sampler, drop_last=train)


def get_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


def get_criterion(cfg: Config) -> torch.nn.Module:
    return torch.nn.CrossEntropyLoss()


def evaluate(model: torch.nn.Module, loader: Any, cfg: Config) -> dict[str, float]:
    """Top-1 accuracy (percent), summed over ranks under torchrun."""
    device = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64)
    for images, labels in loader:
        logits = model(images.to(device))
        counts += torch.tensor([(logits.argmax(1).cpu() == labels.cpu()).sum().item(),
                                len(labels)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return {"accuracy": 100.0 * (counts[0] / counts[1]).item()}
