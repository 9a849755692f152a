from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pidnet.data import (CamVid, Cityscapes, SegmentationTransform, SyntheticScenes,
                         boundary_map, detect_dataset, render_scene)
from pidnet.data.cityscapes import CAMVID_COLOURS
from pidnet.data.synthetic import CLASS_NAMES
from pidnet.errors import DataError


def test_synthetic_scenes_are_deterministic_and_in_range():
    a_img, a_lab = render_scene(3, 7, 64, 128)
    b_img, b_lab = render_scene(3, 7, 64, 128)
    c_img, _ = render_scene(3, 8, 64, 128)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (64, 128, 3) and a_img.dtype == np.uint8
    assert a_lab.max() < len(CLASS_NAMES)


def test_synthetic_scenes_cover_every_class():
    seen = set()
    for i in range(20):
        seen |= set(np.unique(render_scene(0, i, 96, 192)[1]).tolist())
    assert seen == set(range(len(CLASS_NAMES)))


def test_dataset_items_and_training_transform():
    ds = SyntheticScenes(4, (64, 128), seed=1, transform=SegmentationTransform(
        crop_size=(48, 96), train=True, scale_range=(0.75, 1.5), base_size=64))
    torch.manual_seed(0)
    image, targets = ds[2]
    assert image.shape == (3, 48, 96) and image.dtype == torch.float32
    label = targets["label"]
    assert label.dtype == torch.int64 and label.shape == (48, 96)
    assert set(label.unique().tolist()) <= set(range(len(CLASS_NAMES))) | {255}
    assert targets["boundary"].shape == (48, 96)
    with pytest.raises(IndexError):
        ds[4]


def test_boundary_map_marks_class_changes_only():
    label = torch.zeros(6, 6, dtype=torch.long)
    label[:, 3:] = 1
    label[0, 0] = 255
    edge = boundary_map(label, width=1)
    assert edge[:, 2:4].eq(1).all() and edge[:, [0, 1, 4, 5]][1:].eq(0).all()
    assert edge[0, 0] == 0      # ignore pixels are never edges


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cityscapes_loader_on_a_tiny_tree(tmp_path):
    ids = np.array([[7, 8, 26, 0], [23, 33, 1, 24]], dtype=np.uint8)
    for city in ("aachen", "bremen"):
        _png(tmp_path / f"leftImg8bit/train/{city}/{city}_000000_000019_leftImg8bit.png",
             np.full((2, 4, 3), 100, np.uint8))
        _png(tmp_path / f"gtFine/train/{city}/{city}_000000_000019_gtFine_labelIds.png", ids)
    assert detect_dataset(tmp_path) == "cityscapes"
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2
    image, label = ds[0]
    assert image.shape == (3, 2, 4)
    assert label.tolist() == [[0, 1, 13, 255], [10, 18, 255, 11]]
    with pytest.raises(DataError, match="leftImg8bit"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="label .* is missing"):
        Cityscapes(tmp_path, "train")


def test_camvid_colour_labels(tmp_path):
    colours = np.array([[CAMVID_COLOURS[3], CAMVID_COLOURS[8], (1, 2, 3)]], dtype=np.uint8)
    _png(tmp_path / "train/0001TP_006690.png", np.zeros((1, 3, 3), np.uint8))
    _png(tmp_path / "train_labels/0001TP_006690_L.png", colours)
    (tmp_path / "val").mkdir()
    assert detect_dataset(tmp_path) == "camvid"
    _, label = CamVid(tmp_path, "train")[0]
    assert label.tolist() == [[3, 8, 255]]


def test_missing_data_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="neither"):
        detect_dataset(tmp_path)
