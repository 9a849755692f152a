"""Synthetic street scenes: the embedded default dataset, no download needed.

Each scene is drawn from ``numpy.random.default_rng([seed, index])``, so a (seed, index) pair
always gives the same image and label at any size. The scenes are built to be learnable but not
trivial: classes share colours (road, sidewalk, pole and building are all greys) and are told
apart by texture, shape and context; lighting, colour casts, shadows and sensor noise vary per
image; poles and pedestrians are thin and small.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, PERSON, CAR = range(len(CLASS_NAMES))


def render_scene(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: an ``(H, W, 3)`` uint8 image and an ``(H, W)`` uint8 label map."""
    rng = np.random.default_rng([seed, index])
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    label = np.full((h, w), SKY, np.uint8)

    def paint(mask: np.ndarray, cls: int, colour: np.ndarray, texture: np.ndarray | float = 0.0
              ) -> None:
        label[mask] = cls
        shade = colour[None, :] * (1.0 + (texture[mask][:, None] if isinstance(texture, np.ndarray)
                                          else texture))
        img[mask] = shade

    def grey(lo: float, hi: float) -> np.ndarray:
        return np.full(3, rng.uniform(lo, hi)) + rng.normal(0, 6, 3)

    # sky: a vertical gradient, sometimes overcast grey
    horizon = rng.uniform(0.35, 0.55) * h
    top = rng.choice([np.array([90, 140, 215.0]), grey(150, 210)])
    img[:] = top + (yy[..., None] / h) * rng.uniform(20, 60)

    # buildings along the horizon, with window grids
    x0 = -rng.uniform(0, 0.1) * w
    while x0 < w:
        bw = rng.uniform(0.08, 0.3) * w
        bh = rng.uniform(0.15, 0.45) * h
        mask = (xx >= x0) & (xx < x0 + bw) & (yy >= horizon - bh) & (yy < horizon + 0.05 * h)
        colour = rng.choice([grey(90, 170), np.array([150, 105, 80.0]) + rng.normal(0, 15, 3)])
        period_x, period_y = rng.uniform(5, 12), rng.uniform(6, 14)
        windows = ((np.mod(xx - x0, period_x) < period_x * 0.5)
                   & (np.mod(yy, period_y) < period_y * 0.5)).astype(np.float32)
        paint(mask, BUILDING, colour, -rng.uniform(0.2, 0.5) * windows)
        x0 += bw + rng.uniform(-0.02, 0.05) * w

    # vegetation: clusters of blobs with a leafy high-frequency texture
    leaf = rng.normal(0, 0.18, (h, w)).astype(np.float32)
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, 0.15) * h
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(3, 8)):
            r = rng.uniform(0.03, 0.09) * w
            bx, by = cx + rng.normal(0, r), cy + rng.normal(0, r * 0.6)
            mask |= (xx - bx) ** 2 + (yy - by) ** 2 < r ** 2
        paint(mask, VEGETATION, np.array([60, 120, 50.0]) + rng.normal(0, 15, 3), leaf)

    # road and sidewalks below the horizon, converging to a vanishing point
    vx = rng.uniform(0.3, 0.7) * w
    below = yy >= horizon
    depth = np.clip((yy - horizon) / max(h - horizon, 1.0), 0, 1)
    half = (0.02 + rng.uniform(0.45, 0.7) * depth) * w
    road = below & (np.abs(xx - vx) < half)
    curb = below & ~road & (np.abs(xx - vx) < half * rng.uniform(1.25, 1.6))
    grain = rng.normal(0, 0.05, (h, w)).astype(np.float32)
    paint(road, ROAD, grey(70, 130), grain)
    lane = road & (np.abs(xx - vx) < 0.01 * w + 0.01 * w * depth) & (np.mod(yy, 10) < 5)
    img[lane] = rng.uniform(200, 240)
    tiles = ((np.mod(xx, 7) < 1) | (np.mod(yy, 5) < 1)).astype(np.float32) * -0.2
    paint(curb, SIDEWALK, grey(100, 170), tiles + grain)
    ground = below & ~road & ~curb
    paint(ground, VEGETATION, np.array([70, 110, 45.0]) + rng.normal(0, 12, 3), leaf)

    # cars on the road: body, dark windows and wheels, sized by distance
    for _ in range(rng.integers(0, 4)):
        cy = rng.uniform(horizon + 0.1 * (h - horizon), h)
        scale = 0.1 + 0.9 * (cy - horizon) / (h - horizon)
        cw, ch = 0.22 * w * scale, 0.12 * w * scale
        cx = vx + rng.uniform(-0.8, 0.8) * half[int(min(cy, h - 1)), 0] - cw / 2
        body = (xx >= cx) & (xx < cx + cw) & (yy >= cy - ch) & (yy < cy)
        colour = rng.uniform(20, 235, 3)
        window = body & (yy < cy - ch * 0.6) & (xx > cx + cw * 0.15) & (xx < cx + cw * 0.85)
        paint(body, CAR, colour, -0.6 * window.astype(np.float32))
        for wx in (cx + cw * 0.2, cx + cw * 0.8):
            wheel = (xx - wx) ** 2 + (yy - cy) ** 2 < (ch * 0.22) ** 2
            paint(wheel, CAR, np.full(3, 25.0))

    # poles: thin vertical lines standing on the sidewalk
    for _ in range(rng.integers(1, 6)):
        py = rng.uniform(horizon + 0.05 * (h - horizon), h)
        side = rng.choice([-1, 1])
        px = vx + side * half[int(min(py, h - 1)), 0] * rng.uniform(1.05, 1.25)
        scale = 0.2 + 0.8 * (py - horizon) / (h - horizon)
        pw = max(1.5, 0.012 * w * scale)
        mask = (np.abs(xx - px) < pw) & (yy <= py) & (yy > py - 0.55 * h * scale)
        paint(mask, POLE, grey(60, 140))

    # pedestrians: a head and a body, on the sidewalks
    for _ in range(rng.integers(0, 6)):
        py = rng.uniform(horizon + 0.05 * (h - horizon), h)
        side = rng.choice([-1, 1])
        px = vx + side * half[int(min(py, h - 1)), 0] * rng.uniform(1.0, 1.4)
        scale = 0.2 + 0.8 * (py - horizon) / (h - horizon)
        ph, pw = 0.28 * h * scale, 0.035 * w * scale
        body = ((xx - px) / pw) ** 2 + ((yy - (py - ph * 0.4)) / (ph * 0.4)) ** 2 < 1
        head = (xx - px) ** 2 + (yy - (py - ph * 0.88)) ** 2 < (pw * 0.7) ** 2
        paint(body | head, PERSON, rng.uniform(20, 235, 3))

    # lighting: a global gain and colour cast (one scene in three at dusk or night, where
    # features are small against the ranges set by daylight scenes: what per-tensor INT8
    # ranges handle worst), a soft cast shadow, sensor noise
    gain = rng.uniform(0.15, 0.4) if rng.random() < 1 / 3 else rng.uniform(0.6, 1.3)
    img *= gain * rng.uniform(0.9, 1.1, 3)
    a, b, c = rng.normal(size=3)
    img[a * (xx - w / 2) + b * (yy - h / 2) + c * 0.3 * w > 0] *= rng.uniform(0.55, 0.9)
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


class SyntheticScenes(Dataset):
    """``length`` synthetic scenes of ``size = (H, W)``; items go through ``transform``.

    Rendered scenes are kept in memory after their first use (they are deterministic), so
    later epochs pay only for augmentation.
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(self, length: int, size: tuple[int, int], seed: int = 0,
                 transform=None, cache: bool = True) -> None:
        self.length, self.size, self.seed = length, tuple(size), seed
        self.transform = transform
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw scene: a (3, H, W) uint8 image and an (H, W) int64 label."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, label = render_scene(self.seed, index, *self.size)
        item = (torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                torch.from_numpy(label).long())
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label = self.load(index)
        return self.transform(image, label) if self.transform else (image, label)
