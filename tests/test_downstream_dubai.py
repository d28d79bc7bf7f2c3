"""Dubai masks and crops on the real tiles: colour decoding, split by tile, bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from downstream import dubai
from conftest import DATA
from rsprune.cli import UsageError
from rsprune.imageio import load_rgb

ROOT = DATA / "dubai_seg"
README_COLOURS = {  # ../shared/data/README.md, "Mask colours of dubai_seg"
    (60, 16, 152): "building", (132, 41, 246): "land", (110, 193, 228): "road",
    (254, 221, 58): "vegetation", (226, 169, 41): "water", (155, 155, 155): "unlabeled"}


def test_every_pixel_of_every_real_mask_maps_to_one_of_the_6_classes():
    pairs = dubai.find_pairs(ROOT)
    assert len(pairs) == 72
    total_unknown = 0
    for _, _, mask_path in pairs:
        rgb = load_rgb(mask_path)
        labels, unknown = dubai.decode_mask(rgb)
        assert labels.shape == rgb.shape[:2] and labels.max() < 6
        flat = rgb.reshape(-1, 3).astype(np.int64)
        codes, inverse, counts = np.unique(flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2],
                                           return_inverse=True, return_counts=True)
        colours = [(int(c) // 65536, int(c) // 256 % 256, int(c) % 256) for c in codes]
        expect = np.array([dubai.CLASSES.index(README_COLOURS.get(c, "unlabeled")) for c in colours],
                          np.uint8)[inverse.reshape(-1)]
        assert np.array_equal(labels.reshape(-1), expect), mask_path
        n_outside = sum(int(n) for c, n in zip(colours, counts) if c not in README_COLOURS)
        assert unknown == n_outside
        total_unknown += unknown
    assert total_unknown > 0  # the real masks hold black pixels outside the table: they are counted


def _link_tiles(dst, names):
    for name in names:
        (dst / name).symlink_to(ROOT / name, target_is_directory=True)
    return dst


def test_split_holds_out_whole_tiles(tmp_path):
    root = _link_tiles(tmp_path, ["Tile_2", "Tile_3"])  # Tile_3's masks hold a few black pixels
    with pytest.warns(UserWarning, match="outside the 6 classes"):
        train, test, info = dubai.split_crops(root, ["Tile_2"], crop=256, stride=256, resolution=64)
    assert {s.split("/")[0] for s in train.source} == {"Tile_3"}
    assert {s.split("/")[0] for s in test.source} == {"Tile_2"}
    # Tile_3 parts are 682x658 (2 x 2 crops of 256), Tile_2 parts about 509x544 (1 x 2), 9 parts each.
    assert len(train) + len(test) + info["crops_dropped_unlabeled"] == 9 * 4 + 9 * 2
    assert len(train) > 0 and len(test) > 0
    assert train.images.shape[1:] == (64, 64, 3) and train.labels.shape[1:] == (64, 64)
    assert train.labels.max() < 6 and info["unknown_colour_pixels"] > 0


def test_crop_larger_than_tiles_warns_and_then_errors(tmp_path):
    root = _link_tiles(tmp_path, ["Tile_1", "Tile_2"])
    with pytest.warns(UserWarning, match="smaller than the 520 px crop"):
        with pytest.raises(UsageError, match="no test crops of 520 px"):
            dubai.split_crops(root, ["Tile_2"], crop=520, stride=520, resolution=64)
    with pytest.raises(UsageError, match="not found"):
        dubai.split_crops(root, ["Tile_9"], crop=64, stride=64, resolution=64)


def test_unknown_colour_in_a_mask_is_counted_and_mapped_to_unlabeled(tmp_path):
    """A real image and its real mask with a patch painted in a colour of classes.json (#50E3C2)."""
    src_img, src_mask = ROOT / "Tile_2" / "images" / "image_part_001.jpg", ROOT / "Tile_2" / "masks" / "image_part_001.png"
    (tmp_path / "Tile_X" / "images").mkdir(parents=True)
    (tmp_path / "Tile_X" / "masks").mkdir()
    (tmp_path / "Tile_X" / "images" / src_img.name).symlink_to(src_img)
    mask = load_rgb(src_mask).copy()
    mask[:10, :20] = (0x50, 0xE3, 0xC2)
    Image.fromarray(mask).save(tmp_path / "Tile_X" / "masks" / src_mask.name)
    report = dubai.CropReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crops = dubai.cut(dubai.find_pairs(tmp_path), 128, 128, 64, 1.0, report)
    _, before = dubai.decode_mask(load_rgb(src_mask))
    assert report.unknown_pixels == before + 200 - int((load_rgb(src_mask)[:10, :20] == (0x50, 0xE3, 0xC2)).all(-1).sum())
    assert crops.labels[0, 0, 0] == dubai.UNLABELED  # the painted corner, resized by nearest neighbour
