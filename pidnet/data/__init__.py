"""Datasets: built-in synthetic street scenes, Cityscapes, CamVid."""
from __future__ import annotations

from .cityscapes import CamVid, Cityscapes, detect_dataset
from .synthetic import CLASS_NAMES, SyntheticScenes, render_scene
from .transforms import SegmentationTransform, boundary_map

__all__ = ["CLASS_NAMES", "CamVid", "Cityscapes", "SegmentationTransform", "SyntheticScenes",
           "boundary_map", "detect_dataset", "render_scene"]
