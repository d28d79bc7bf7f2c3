"""The Dubai land-cover tiles (`dubai_seg`): mask colours, crops, and the split by tile.

Layout: `ROOT/Tile_N/{images,masks}/image_part_NNN.{jpg,png}`. The colours in the masks are
those of ../shared/data/README.md, not those of the `classes.json` shipped with the tiles (which
occur nowhere). A pixel of any other colour (the masks hold some pure black) is counted,
mapped to `unlabeled`, and reported with a warning, never silently dropped.

Crops are cut on a regular grid from every image part; the split is by whole tile (every crop of
a test tile is held out), so no test crop overlaps or neighbours a training crop.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rsprune.cli import UsageError
from rsprune.imageio import UnreadableImage, load_rgb, resize

log = logging.getLogger(__name__)

CLASSES = ("building", "land", "road", "vegetation", "water", "unlabeled")
COLOURS = np.array([(60, 16, 152), (132, 41, 246), (110, 193, 228), (254, 221, 58), (226, 169, 41),
                    (155, 155, 155)], np.uint8)
UNLABELED = CLASSES.index("unlabeled")


def decode_mask(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """RGB mask (H, W, 3) uint8 -> (class ids (H, W) uint8, number of pixels of unknown colour).

    Unknown colours become `unlabeled`; the caller decides how loudly to report them.
    """
    code = _pack(rgb)
    labels = np.full(code.shape, UNLABELED, np.uint8)
    known = np.zeros(code.shape, bool)
    for k, colour in enumerate(COLOURS):
        hit = code == _pack(colour[None, None])[0, 0]
        labels[hit] = k
        known |= hit
    return labels, int((~known).sum())


def colourise(labels: np.ndarray) -> np.ndarray:
    """Class ids (..., H, W) -> RGB (..., H, W, 3) in the masks' own colours (for sample sheets)."""
    return COLOURS[labels]


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(tile, image path, mask path) for every image part that has a mask, sorted."""
    root = Path(root)
    tiles = sorted(p for p in root.glob("*") if p.is_dir() and (p / "images").is_dir())
    if not tiles:
        raise UsageError(f"no Tile_*/images folders under {root} (set data.dubai=DIR)")
    pairs = []
    for tile in tiles:
        for img in sorted((tile / "images").glob("*")):
            mask = tile / "masks" / (img.stem + ".png")
            if mask.is_file():
                pairs.append((tile.name, img, mask))
            else:
                log.warning("%s: no mask %s; skipped", img, mask.name)
    return pairs


@dataclass
class Crops:
    """Crops of one split: images (N, R, R, 3) uint8, labels (N, R, R) uint8, where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: list = field(default_factory=list)  # "Tile_N/image_part_NNN:y,x" per crop

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class CropReport:
    """What cutting met: unknown-colour pixels, skipped parts (too small / unreadable), dropped crops."""

    unknown_pixels: int = 0
    total_pixels: int = 0
    too_small: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    dropped_unlabeled: int = 0

    def as_dict(self) -> dict:
        return {"unknown_colour_pixels": self.unknown_pixels, "mask_pixels": self.total_pixels,
                "parts_smaller_than_crop": self.too_small, "unreadable": self.unreadable,
                "crops_dropped_unlabeled": self.dropped_unlabeled}


def with_mirrors(crops: Crops) -> Crops:
    """The crops followed by their horizontal mirrors (image and mask flipped together, in pixels)."""
    from downstream.conditioning import with_flips

    images, labels = with_flips(crops.images, crops.labels)
    return Crops(images, labels, list(crops.source) + [f"{s}:flip" for s in crops.source])


def grid_origins(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of every full crop on a regular grid (the remainder at the edges is left)."""
    return [(y, x) for y in range(0, h - crop + 1, stride) for x in range(0, w - crop + 1, stride)]


def cut(pairs, crop: int, stride: int, resolution: int, max_unlabeled: float,
        report: CropReport) -> Crops:
    """Cut every (tile, image, mask) into crops of `crop` px resized to `resolution` px.

    Images are resized antialiased (bicubic); labels by nearest neighbour, so every label stays a
    real class id. A crop whose unlabeled fraction exceeds `max_unlabeled` is dropped.
    """
    images, labels, source = [], [], []
    for tile, img_path, mask_path in pairs:
        try:
            img, rgb_mask = load_rgb(img_path), load_rgb(mask_path)
        except UnreadableImage as e:
            report.unreadable.append(f"{img_path}: {e}")
            continue
        if img.shape[:2] != rgb_mask.shape[:2]:
            report.unreadable.append(f"{img_path}: image {img.shape[:2]} and mask {rgb_mask.shape[:2]} differ")
            continue
        lab, unknown = decode_mask(rgb_mask)
        report.unknown_pixels += unknown
        report.total_pixels += lab.size
        h, w = lab.shape
        if h < crop or w < crop:
            report.too_small.append(f"{tile}/{img_path.name} ({w}x{h} < {crop})")
            continue
        for y, x in grid_origins(h, w, crop, stride):
            lab_c = lab[y:y + crop, x:x + crop]
            if (lab_c == UNLABELED).mean() > max_unlabeled:
                report.dropped_unlabeled += 1
                continue
            images.append(resize(img[y:y + crop, x:x + crop], resolution))
            labels.append(_resize_labels(lab_c, resolution))
            source.append(f"{tile}/{img_path.stem}:{y},{x}")
    r = resolution
    return Crops(np.stack(images) if images else np.zeros((0, r, r, 3), np.uint8),
                 np.stack(labels) if labels else np.zeros((0, r, r), np.uint8), source)


def _resize_labels(lab: np.ndarray, size: int) -> np.ndarray:
    if lab.shape == (size, size):
        return lab
    return np.array(Image.fromarray(lab).resize((size, size), Image.NEAREST))


def split_crops(root, test_tiles, crop: int, stride: int, resolution: int,
                max_unlabeled: float = 0.5) -> tuple[Crops, Crops, dict]:
    """(train crops, test crops, report) with every crop of `test_tiles` in the test split.

    Warns about unknown mask colours and parts smaller than the crop; raises UsageError when a
    named test tile does not exist or a split ends up empty.
    """
    pairs = find_pairs(root)
    tiles = sorted({t for t, _, _ in pairs})
    missing = sorted(set(test_tiles) - set(tiles))
    if missing:
        raise UsageError(f"test tiles {missing} not found under {root}; have {tiles}")
    report = CropReport()
    train = cut([p for p in pairs if p[0] not in test_tiles], crop, stride, resolution, max_unlabeled, report)
    test = cut([p for p in pairs if p[0] in test_tiles], crop, stride, resolution, max_unlabeled, report)
    _warn(report, crop)
    for name, part in (("train", train), ("test", test)):
        if len(part) == 0:
            raise UsageError(f"no {name} crops of {crop} px from {root} (test tiles {list(test_tiles)}); "
                             f"parts smaller than the crop: {len(report.too_small)}; use a smaller crop")
    info = report.as_dict() | {"tiles": tiles, "test_tiles": sorted(test_tiles),
                               "n_train": len(train), "n_test": len(test)}
    return train, test, info


def _warn(report: CropReport, crop: int) -> None:
    if report.unknown_pixels:
        frac = report.unknown_pixels / max(report.total_pixels, 1)
        warnings.warn(f"dubai masks: {report.unknown_pixels} pixels ({frac:.2%}) have a colour outside the "
                      f"6 classes; mapped to unlabeled", stacklevel=3)
    if report.too_small:
        warnings.warn(f"dubai: {len(report.too_small)} image parts are smaller than the {crop} px crop and "
                      f"were skipped: {', '.join(report.too_small[:3])}", stacklevel=3)
    for msg in report.unreadable:
        log.warning("dubai: skipped %s", msg)


def one_hot(labels: np.ndarray, n: int = len(CLASSES)) -> np.ndarray:
    """Class ids (N, H, W) -> float32 one-hot (N, n, H, W)."""
    return (labels[:, None] == np.arange(n, dtype=labels.dtype)[None, :, None, None]).astype(np.float32)
