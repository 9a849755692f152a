"""Worked example of the four hooks (plus ``evaluate``): PIDNet on the built-in synthetic
street scenes, or on Cityscapes / CamVid when ``data_path`` points at one.

Settings live in the config's free-form ``user:`` section; ``USER_DEFAULTS`` lists them.
Copy this file to adapt the toolkit to another model: each hook is a few lines.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pidnet.config import Bounds, Config
from pidnet.data import CamVid, Cityscapes, SegmentationTransform, SyntheticScenes, detect_dataset
from pidnet.engine import seed_worker
from pidnet.errors import ConfigError, DataError
from pidnet.losses import PIDNetLoss
from pidnet.metrics import ConfusionMatrix
from pidnet.model import create_model

USER_DEFAULTS: dict[str, Any] = {
    "model": "pidnet_s",          # pidnet_s | pidnet_m | pidnet_l
    "batch_size": 8,
    "eval_batch_size": 8,
    "workers": 0,
    "image_size": [128, 256],     # synthetic scenes: rendered size (H, W)
    "crop_size": [128, 256],      # training crop (H, W)
    "scale_range": [0.75, 1.5],   # random rescale of the shorter side before cropping
    "train_images": 400,          # synthetic scenes per split
    "val_images": 200,
    "test_images": 200,           # held out: never trained on nor used to choose anything
    "calib_images": 64,
    "data_seed": 0,               # which synthetic scenes; independent of the training seed
    "boundary_width": 1,
    "ohem_min_kept": 20000,
    "ohem_thresh": 0.9,
    "class_weights": None,
}
_DATASETS = {"cityscapes": Cityscapes, "camvid": CamVid}
# get_model builds an untrained PIDNet: calibration, QAT, sensitivity and export need model_path
# (trained float weights, e.g. from qat_train.py --mode float, or an official checkpoint).
RETURNS_TRAINED_MODEL = False
# split="test": synthetic scenes of their own, or CamVid's test split (Cityscapes has no public
# test labels); held out from training and every choice, read only by bench.qat_modes
HAS_TEST_SPLIT = True


MODELS = ("pidnet_s", "pidnet_m", "pidnet_l")
# Allowed values of the numeric settings; the pairs hold two numbers each.
USER_BOUNDS: dict[str, Bounds] = {
    "batch_size": Bounds(1), "eval_batch_size": Bounds(1), "workers": Bounds(0),
    "image_size": Bounds(8), "crop_size": Bounds(8), "scale_range": Bounds(above=0),
    "train_images": Bounds(1), "val_images": Bounds(1), "test_images": Bounds(1),
    "calib_images": Bounds(1),
    "data_seed": Bounds(0), "boundary_width": Bounds(1), "ohem_min_kept": Bounds(1),
    "ohem_thresh": Bounds(above=0, high=1), "class_weights": Bounds(0),
}
PAIRS = ("image_size", "crop_size", "scale_range")
REALS = ("scale_range", "ohem_thresh", "class_weights")   # the others are whole numbers


def settings(cfg: Config) -> dict[str, Any]:
    """``USER_DEFAULTS`` overridden by ``cfg.user``; an unknown key or a bad value is a
    ``ConfigError`` (exit 2, one line)."""
    for key in cfg.user:
        if key not in USER_DEFAULTS:
            raise ConfigError(f"unknown config key 'user.{key}' for my_model.py; valid keys: "
                              f"{', '.join(USER_DEFAULTS)}")
    user = {**USER_DEFAULTS, **cfg.user}
    if user["model"] not in MODELS:
        raise ConfigError(f"config key 'user.model' must be one of {', '.join(MODELS)}, "
                          f"got {user['model']!r}")
    for key, bounds in USER_BOUNDS.items():
        value = user[key]
        if key == "class_weights" and value is None:
            continue
        items = value if isinstance(value, list) else [value]
        kinds = (int, float) if key in REALS else (int,)
        numeric = all(isinstance(v, kinds) and not isinstance(v, bool) for v in items)
        if key in PAIRS:
            shaped, what = isinstance(value, list) and len(value) == 2, "two numbers"
            what = what if key in REALS else "two integers"
        elif key == "class_weights":
            shaped, what = isinstance(value, list), "null or a list of numbers"
        else:
            shaped = not isinstance(value, list)
            what = "a number" if key in REALS else "an integer"
        if not (numeric and shaped):
            raise ConfigError(f"config key 'user.{key}' must be {what}, got {value!r}")
        bounds.check(f"user.{key}", value)
    if user["scale_range"][0] > user["scale_range"][1]:
        raise ConfigError(f"config key 'user.scale_range' must be [low, high] with low <= high, "
                          f"got {user['scale_range']!r}")
    return user


def check_config(cfg: Config) -> None:
    """Checked at start-up, before any work."""
    settings(cfg)


def num_classes(cfg: Config) -> int:
    if cfg.data_path is None:
        return SyntheticScenes.num_classes
    return _DATASETS[detect_dataset(cfg.data_path)].num_classes


def get_model(cfg: Config) -> torch.nn.Module:
    return create_model(settings(cfg)["model"], num_classes=num_classes(cfg), augment=True)


def get_data_loader(cfg: Config, split: str) -> DataLoader:
    user = settings(cfg)
    train = split == "train"
    transform = SegmentationTransform(
        crop_size=tuple(user["crop_size"]), train=train, scale_range=tuple(user["scale_range"]),
        boundary_width=user["boundary_width"], base_size=min(user["image_size"]))
    if cfg.data_path is None:
        # calib reuses training scenes without augmentation; val and test scenes are never
        # trained on, and test is never used to choose anything (bench.qat_modes reports on it)
        seed = user["data_seed"] + {"val": 1000, "test": 2000}.get(split, 0)
        length = user[f"{split}_images"]
        dataset = SyntheticScenes(length, tuple(user["image_size"]), seed, transform)
    else:
        name = detect_dataset(cfg.data_path)
        if split == "test" and name == "cityscapes":
            raise DataError("Cityscapes has no public test labels: no held-out split to report on")
        dataset = _DATASETS[name](cfg.data_path, split if split in ("val", "test") else "train",
                                  transform)
        if split == "calib":
            dataset = torch.utils.data.Subset(dataset, range(min(len(dataset),
                                                                 user["calib_images"])))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.seed) if distributed else None
    return DataLoader(dataset, batch_size=user["batch_size" if train else "eval_batch_size"],
                      shuffle=train and sampler is None, sampler=sampler, drop_last=train,
                      num_workers=user["workers"], worker_init_fn=seed_worker,
                      persistent_workers=user["workers"] > 0)


def get_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


def get_criterion(cfg: Config) -> PIDNetLoss:
    user = settings(cfg)
    return PIDNetLoss(class_weights=user["class_weights"], ohem_thresh=user["ohem_thresh"],
                      ohem_min_kept=user["ohem_min_kept"])


def get_prediction(outputs: Any) -> torch.Tensor:
    """The main logits: PIDNet with its auxiliary heads returns [P head, main, boundary]."""
    return outputs[1] if isinstance(outputs, (list, tuple)) and len(outputs) == 3 else outputs


def evaluate(model: torch.nn.Module, loader: DataLoader, cfg: Config) -> dict[str, float]:
    """mIoU (percent), pixel accuracy and per-class IoU on ``loader``."""
    device = next(model.parameters()).device
    matrix = ConfusionMatrix(num_classes(cfg))
    for images, targets in loader:
        logits = get_prediction(model(images.to(device)))
        matrix.update(logits, targets["label"].to(device))
    matrix.all_reduce()
    names = getattr(loader.dataset, "class_names", None) or [
        str(i) for i in range(matrix.num_classes)]
    per_class = {f"iou_{n.replace(' ', '_')}": 100.0 * v
                 for n, v in zip(names, matrix.iou().tolist())}
    return {**matrix.compute(), **per_class}
