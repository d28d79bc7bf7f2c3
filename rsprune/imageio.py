"""Image reading shared by every stage: any RS tile in, RGB uint8 out.

Band rule (documented in the README):
- 1 band (L, I;16, F) -> replicated to RGB; 2 bands (LA) -> the first band replicated.
- 3 bands -> RGB as stored; 4+ bands (RGBA, CMYK, multispectral TIFF) -> the first three
  bands taken as R, G, B (alpha and NIR are dropped, never composited).
- Palette images are expanded through their palette.
- Data deeper than 8 bits (16-bit PNG/TIFF, float TIFF) -> per-image linear stretch of the
  0.5-99.5 percentile range to 0-255, since RS sensors rarely fill their dynamic range.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
STRETCH_PCT = (0.5, 99.5)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message is the reason recorded."""


def list_images(root: str | os.PathLike) -> list[str]:
    """All image files under `root`, recursively, as sorted paths relative to `root`."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Bring any numeric array to uint8 by the band rule's stretch (uint8 passes through)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(finite, STRETCH_PCT)
    if hi <= lo:  # constant image: no information to stretch, and no division by zero
        return np.zeros(a.shape, np.uint8)
    out = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1) * 255.0
    return np.rint(out).astype(np.uint8)


def bands_to_rgb(a: np.ndarray) -> np.ndarray:
    """HxW or HxWxC array of any dtype -> HxWx3 uint8 by the band rule."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise UnreadableImage(f"unsupported array shape {a.shape}")
    c = a.shape[2]
    if c == 1 or c == 2:
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif c > 3:
        a = a[:, :, :3]
    return np.require(to_uint8(a), requirements=["C", "W"])


def _read_tiff(src) -> np.ndarray:
    import tifffile

    a = tifffile.imread(src)
    # Planar storage (C, H, W) with few bands: move bands last.
    if a.ndim == 3 and a.shape[0] <= 16 and a.shape[2] > 16:
        a = np.moveaxis(a, 0, 2)
    return a


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    if im.mode == "1":
        im = im.convert("L")
    return np.asarray(im)


def load_array(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode one image file (or its bytes, already read) to its raw HxW[xC] array, or raise
    UnreadableImage with the reason."""
    path = str(path)
    src = io.BytesIO(data) if data is not None else path
    try:
        if path.lower().endswith((".tif", ".tiff")):
            try:
                a = _read_tiff(src)
            except Exception:  # not every .tif is a TIFF tifffile reads; let PIL try
                if data is not None:
                    src.seek(0)
                with Image.open(src) as im:
                    im.load()
                    a = _pil_to_array(im)
        else:
            with Image.open(src) as im:
                im.load()
                a = _pil_to_array(im)
    except Exception as e:  # any decoder failure is a per-file problem, never a crash
        raise UnreadableImage(_reason(e)) from None
    if a.size == 0 or a.ndim not in (2, 3):
        raise UnreadableImage(f"empty or unsupported array of shape {a.shape}")
    return a


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode one image file to HxWx3 uint8 by the band rule, or raise UnreadableImage."""
    return bands_to_rgb(load_array(path, data))


def _reason(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200]


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Antialiased (bicubic) resize to size x size; the aspect ratio is not kept, since RS
    tiles are square or nearly so and a centre crop would drop scene content."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size, size), Image.BICUBIC, reducing_gap=None))


def grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the same rounding as PIL's convert('L')."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
