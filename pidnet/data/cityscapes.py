"""Cityscapes and CamVid from their standard folder layouts."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
# gtFine labelIds -> the 19 training ids; every other id is ignored (255).
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian",
    "bicyclist")
CAMVID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


def read_image(path: Path, mode: str) -> torch.Tensor:
    """A PNG/JPEG as a (C, H, W) uint8 tensor in PIL ``mode`` (``RGB`` or ``L``)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert(mode))
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _lookup_table(mapping: dict[int, int], ignore_index: int = 255) -> torch.Tensor:
    table = torch.full((256,), ignore_index, dtype=torch.int64)
    for source, target in mapping.items():
        table[source] = target
    return table


def _pair_up(images: list[Path], label_of: Callable[[Path], Path], where: str
             ) -> list[tuple[Path, Path]]:
    """(image, label) pairs; a missing label or an empty folder is a ``DataError``."""
    if not images:
        raise DataError(f"no images found in {where}")
    pairs = [(image, label_of(image)) for image in images]
    for image, label in pairs:
        if not label.is_file():
            raise DataError(f"label {label} is missing for {image}")
    return pairs


class _PairedImages(Dataset):
    """Image/label file pairs read from disk, passed through ``transform``."""

    num_classes: int
    class_names: tuple[str, ...]

    def __init__(self, pairs: list[tuple[Path, Path]], transform=None) -> None:
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def decode_label(self, path: Path) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image = read_image(image_path, "RGB")
        label = self.decode_label(label_path)
        return self.transform(image, label) if self.transform else (image, label)


class Cityscapes(_PairedImages):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine`` labelIds."""

    num_classes = len(CITYSCAPES_CLASSES)
    class_names = CITYSCAPES_CLASSES
    _table = _lookup_table(CITYSCAPES_LABEL_TO_TRAIN)

    def __init__(self, root: str | Path, split: str = "train", transform=None) -> None:
        root = Path(root)
        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir} does not exist; data_path must be a Cityscapes root "
                            "holding leftImg8bit/ and gtFine/")
        def label_of(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            return root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"

        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        super().__init__(_pair_up(images, label_of, f"{image_dir}/<city>/"), transform)

    def decode_label(self, path: Path) -> torch.Tensor:
        ids = read_image(path, "L")[0].long()
        return self._table[ids]


class CamVid(_PairedImages):
    """``<split>/*.png`` with colour labels in ``<split>_labels/*_L.png`` (11 classes; colours
    outside the 11 are ignored)."""

    num_classes = len(CAMVID_CLASSES)
    class_names = CAMVID_CLASSES

    def __init__(self, root: str | Path, split: str = "train", transform=None) -> None:
        root = Path(root)
        image_dir, label_dir = root / split, root / f"{split}_labels"
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DataError(f"{root} is not a CamVid root: expected {split}/ and {split}_labels/")
        images = sorted(image_dir.glob("*.png"))
        pairs = _pair_up(images, lambda image: label_dir / f"{image.stem}_L.png", str(image_dir))
        super().__init__(pairs, transform)
        codes = torch.tensor([(r << 16) | (g << 8) | b for r, g, b in CAMVID_COLOURS])
        self._codes, self._order = codes.sort()

    def decode_label(self, path: Path) -> torch.Tensor:
        rgb = read_image(path, "RGB").long()
        code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
        pos = torch.searchsorted(self._codes, code).clamp(max=len(self._codes) - 1)
        hit = self._codes[pos] == code
        return torch.where(hit, self._order[pos], torch.full_like(code, 255))


def detect_dataset(root: str | Path) -> str:
    """``'cityscapes'`` or ``'camvid'`` from the folder layout under ``root``."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data_path {root} does not exist; set data_path to a dataset root "
                        "or to null for the built-in synthetic scenes")
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "train").is_dir() and (root / "train_labels").is_dir():
        return "camvid"
    raise DataError(f"{root} is neither a Cityscapes root (leftImg8bit/, gtFine/) nor a CamVid "
                    "root (train/, train_labels/)")
