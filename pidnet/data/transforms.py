"""Joint image/label augmentation (torchvision transforms v2) and boundary maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def boundary_map(label: torch.Tensor, width: int = 2, ignore_index: int = 255) -> torch.Tensor:
    """1.0 where a pixel lies within ``width`` pixels of a change of class, else 0.0.

    Pixels next to the ignore label are not counted as edges (their class is unknown).
    """
    lab = label.float()[None, None]
    k = 2 * width + 1
    valid = (label != ignore_index).float()[None, None]
    hi = F.max_pool2d(lab.masked_fill(valid == 0, -1.0), k, 1, width)
    lo = -F.max_pool2d(-lab.masked_fill(valid == 0, 1e4), k, 1, width)
    edge = (hi != lo) & (lo < 1e4) & (hi >= 0) & (valid > 0)
    return edge[0, 0].float()


class SegmentationTransform:
    """Turn a (uint8 image, int64 label) pair into ``(normalised image, {'label', 'boundary'})``.

    With ``train=True``: random scale, random crop padded with the ignore label, horizontal
    flip. Evaluation keeps the full image.
    """

    def __init__(self, crop_size: tuple[int, int] | None = None, train: bool = False,
                 scale_range: tuple[float, float] = (0.5, 2.0), ignore_index: int = 255,
                 boundary_width: int = 2, base_size: int | None = None) -> None:
        self.ignore_index = ignore_index
        self.boundary_width = boundary_width
        ops: list[v2.Transform] = []
        if train:
            if crop_size is None:
                raise ValueError("training transforms need a crop_size")
            if base_size is not None:
                lo, hi = (int(base_size * s) for s in scale_range)
                ops.append(v2.RandomResize(lo, max(hi, lo + 1), antialias=True))
            ops += [v2.RandomCrop(crop_size, pad_if_needed=True,
                                  fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
                    v2.RandomHorizontalFlip()]
        ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.ops = v2.Compose(ops)

    def __call__(self, image: torch.Tensor, label: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, label = self.ops(tv_tensors.Image(image), tv_tensors.Mask(label))
        label = label.as_subclass(torch.Tensor).long()
        return image.as_subclass(torch.Tensor), {
            "label": label,
            "boundary": boundary_map(label, self.boundary_width, self.ignore_index)}
