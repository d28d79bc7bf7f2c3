"""Image grids and sample sheets: the one place that tiles uint8 NHWC images into a PNG.

- `grid`: images tiled row-major (the training sample grids, one block of a sheet);
- `sample_sheet`: generated images (left block) beside real images (right block), both at the
  generated images' side (real ones go through the shared antialiased resize), so the sheet
  compares content, not resolution (eval/convergence.py);
- `column_sheet`: one row per sample, one column per image set, e.g. input | output | ground
  truth (the downstream tasks).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from rsprune.cache import atomic_path
from rsprune.imageio import resize

GAP = 8          # pixels between the two blocks of a sample sheet
HEADER = 16      # pixels of caption above them


def grid(images: np.ndarray, cols: int | None = None, background: int = 0) -> np.ndarray:
    """Tile uint8 NHWC images into one HxWx3 grid, row-major; `cols` None: a square-ish grid;
    empty cells hold `background`."""
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = max(1, int(np.ceil(n / cols)))
    out = np.full((rows * h, cols * w, 3), background, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return out


def write_png(array: np.ndarray, path: str | os.PathLike) -> str:
    """An HxWx3 uint8 array as a PNG, written through a temporary name."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return str(path)


def sample_sheet(fake: np.ndarray, real: np.ndarray, path: str | os.PathLike, cols: int = 4,
                 captions: tuple[str, str] = ("generated", "real")) -> str:
    """Write a PNG of `fake` (left) beside `real` (right), both uint8 NHWC; returns the path."""
    fake = np.asarray(fake, np.uint8)
    side = fake.shape[1]
    real = np.stack([resize(np.asarray(r, np.uint8), side) for r in real]) if len(real) else fake[:0]
    n = max(len(fake), len(real))
    cols = max(1, min(cols, n))
    left = grid(fake, cols, background=255)
    right = grid(real, cols, background=255) if len(real) else np.full_like(left, 255)
    h = max(left.shape[0], right.shape[0])
    canvas = np.full((h + HEADER, left.shape[1] + GAP + right.shape[1], 3), 255, np.uint8)
    canvas[HEADER:HEADER + left.shape[0], :left.shape[1]] = left
    canvas[HEADER:HEADER + right.shape[0], left.shape[1] + GAP:] = right
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    draw.text((2, 2), captions[0], fill=(0, 0, 0))
    draw.text((left.shape[1] + GAP + 2, 2), captions[1], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return str(path)


def column_sheet(path, columns: list[np.ndarray], titles: list[str], n: int = 8) -> None:
    """PNG with one row per sample and one column per image set (e.g. input | output | ground truth)."""
    n = min(n, *(len(c) for c in columns))
    f = max(1, 128 // columns[0].shape[1])  # small images are enlarged (nearest) so a sheet is readable
    h, w = columns[0].shape[1] * f, columns[0].shape[2] * f
    pad, head = 2, 14
    sheet = np.full((head + n * (h + pad), len(columns) * (w + pad), 3), 255, np.uint8)
    for j, col in enumerate(columns):
        for i in range(n):
            im = col[i]
            if im.shape[:2] != (h, w):  # enlarged, and the LR input nearest-upsampled to the same size
                im = np.array(Image.fromarray(im).resize((w, h), Image.NEAREST))
            sheet[head + i * (h + pad):head + i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = im
    img = Image.fromarray(sheet)
    draw = ImageDraw.Draw(img)
    for j, title in enumerate(titles):
        draw.text((j * (w + pad) + 2, 1), title, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
