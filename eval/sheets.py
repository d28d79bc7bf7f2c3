"""Sample sheets: one PNG per run, generated images (left block) next to real images (right block).

Both blocks are shown at the same side (the generated images' side; real images are resized
with the shared antialiased resize), so the sheet compares content, not resolution.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from rsprune.cache import atomic_path
from rsprune.imageio import resize

GAP = 8          # pixels between the two blocks
HEADER = 16      # pixels of caption above the blocks


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tile uint8 NHWC images into one HxWx3 grid, row-major; empty cells stay white."""
    n, h, w, _ = images.shape
    rows = max(1, int(np.ceil(n / cols)))
    out = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return out


def sample_sheet(fake: np.ndarray, real: np.ndarray, path: str | os.PathLike, cols: int = 4,
                 captions: tuple[str, str] = ("generated", "real")) -> str:
    """Write a PNG of `fake` (left) beside `real` (right), both uint8 NHWC; returns the path."""
    fake = np.asarray(fake, np.uint8)
    side = fake.shape[1]
    real = np.stack([resize(np.asarray(r, np.uint8), side) for r in real]) if len(real) else fake[:0]
    n = max(len(fake), len(real))
    cols = max(1, min(cols, n))
    left, right = grid(fake, cols), grid(real, cols) if len(real) else np.full_like(grid(fake, cols), 255)
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
