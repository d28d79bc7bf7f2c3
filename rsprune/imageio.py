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
import re
from pathlib import Path

import numpy as np
from PIL import Image

from rsprune import markers, rasters
from rsprune.rasters import LARGE_RASTER

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
STRETCH_PCT = (0.5, 99.5)
# The resize after a shrunk read still has this many source pixels per output pixel to average.
FIT_MARGIN = 2
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f..>"


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message is the reason recorded."""


def list_images(root: str | os.PathLike, exclude=()) -> list[str]:
    """All image files under `root`, recursively, as sorted paths relative to `root`.

    Folder symlinks are followed (RS corpora are often assembled from links), each real folder
    once: a link back to a folder already walked (a loop, or a second link to it) is skipped.
    Folders in `exclude` (a run's output or cache folder inside the corpus) and folders holding a
    run or cache marker (rsprune/markers.py: any run's or cache's folder) are never entered; a
    root that is itself a run folder is walked without the run's output folders.
    """
    root = Path(root)
    skip = {os.path.realpath(e) for e in exclude}
    if markers.marked(root) == markers.RUN_MARKER:
        skip |= {os.path.realpath(root / d) for d in markers.RUN_OUTPUTS}
    seen = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if _enter(os.path.join(dirpath, d), seen, skip))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _enter(path: str, seen: set, skip: set) -> bool:
    try:
        st = os.stat(path)
    except OSError:  # a dangling link: nothing to walk
        return False
    if (st.st_dev, st.st_ino) in seen or os.path.realpath(path) in skip or markers.marked(path):
        return False
    seen.add((st.st_dev, st.st_ino))
    return True


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


def _read_tiff(src, max_side: int | None = None, fit: int | None = None):
    """A TIFF's array. One larger than LARGE_RASTER bytes decoded is read strip by strip (or tile
    by tile, rsprune/rasters.py) when a shrunk copy will do, so memory stays bounded by one
    segment plus the small result (a 6000 x 6000 4-band 16-bit GeoTIFF costs gigabytes in the
    float stretch otherwise):
    - `max_side` (load_grey): decimated to about max_side; returns what _pil_grey does:
      (grey, bands, full (height, width));
    - `fit` (load_sized): block means by the largest integer factor that keeps the smaller side
      at least FIT_MARGIN * fit."""
    import tifffile

    with tifffile.TiffFile(src) as tif:
        page = tif.pages.first
        if (max_side or fit) and page.nbytes > LARGE_RASTER:
            h, w = page.imagelength, page.imagewidth
            try:
                if max_side:
                    a = rasters.decimated(page, max(1, max(h, w) // max_side))
                    return _shrink(grey(bands_to_rgb(a)), max_side), page.samplesperpixel, (h, w)
                return _bands_last(rasters.box_reduced(page, _fit_step(h, w, fit)))
            except rasters.SegmentTooLarge as e:
                raise UnreadableImage(str(e)) from None
        return _bands_last(tif.asarray())


def _bands_last(a: np.ndarray) -> np.ndarray:
    # Planar storage (C, H, W) with few bands: move bands last.
    if a.ndim == 3 and a.shape[0] <= 16 and a.shape[2] > 16:
        a = np.moveaxis(a, 0, 2)
    return a


def _fit_step(h: int, w: int, fit: int) -> int:
    """The largest integer shrink that keeps the smaller side at least FIT_MARGIN * fit."""
    return max(1, min(h, w) // (FIT_MARGIN * fit))


def _pil_to_array(im: Image.Image) -> np.ndarray:
    im.load()
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    if im.mode == "1":
        im = im.convert("L")
    return np.asarray(im)


def _decode(path: str, data: bytes | None, from_pil, max_side: int | None = None, fit: int | None = None):
    """Decode a file (or its bytes, already read): a TIFF tifffile reads comes back as its
    array, anything else as from_pil(the opened PIL image), which decodes it. Any failure,
    conversion included, becomes UnreadableImage with the reason."""
    src = io.BytesIO(data) if data is not None else path
    try:
        if path.lower().endswith((".tif", ".tiff")):
            try:
                return _read_tiff(src, max_side, fit)
            except UnreadableImage:
                raise
            except Exception:  # not every .tif is a TIFF tifffile reads; let PIL try
                if data is not None:
                    src.seek(0)
        with Image.open(src) as im:
            return from_pil(im)
    except UnreadableImage:
        raise
    except Exception as e:  # any decoder failure (memory included) is a per-file problem, never a crash
        raise UnreadableImage(_reason(e)) from None


def _checked(a: np.ndarray) -> np.ndarray:
    if a.size == 0 or a.ndim not in (2, 3):
        raise UnreadableImage(f"empty or unsupported array of shape {a.shape}")
    return a


def load_array(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode one image file to its raw HxW[xC] array, or raise UnreadableImage with the reason."""
    return _checked(_decode(str(path), data, _pil_to_array))


def _shrink(g: np.ndarray, max_side: int | None) -> np.ndarray:
    if not max_side or max(g.shape) <= max_side:
        return g
    s = max_side / max(g.shape)
    size = (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s)))
    return np.asarray(Image.fromarray(g).resize(size, Image.BILINEAR))


def _pil_grey(im: Image.Image, max_side: int | None):
    (w, h), bands = im.size, len(im.getbands())
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        # Decode the stored luma plane only (no chroma upsampling or colour conversion), and let
        # the DCT shrink tiles of 2..8x max_side for free.
        k = next((k for k in (8, 4, 2) if max_side and min(w, h) >= 8 * k and max(w, h) >= k * max_side), 1)
        im.draft("L", (w // k, h // k) if k > 1 else None)
    im.load()
    if im.mode in ("RGB", "L"):  # PIL's convert('L') is grey() in C, same rounding
        g = im if im.mode == "L" else im.convert("L")
        # frombuffer: half the cost of np.asarray(g), which goes through the same tobytes()
        return _shrink(np.frombuffer(g.tobytes(), np.uint8).reshape(g.size[1], g.size[0]), max_side), bands, (h, w)
    return _pil_to_array(im)


def load_grey(path: str | os.PathLike, data: bytes | None = None,
              max_side: int | None = None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """The grey (ITU-R 601 luma) image of a file, no larger than max_side, its band count and its
    full (height, width); or raise UnreadableImage. The entropy filter's reader: it decodes
    as few pixels as it can.

    JPEGs give their stored luma plane, which equals grey(load_rgb(path)) up to the rounding
    of chroma upsampling (within 1 grey level on all but ~0.1% of pixels, saturated ones whose
    RGB clips); other 8-bit RGB/L files give exactly grey(load_rgb(path)); everything else goes
    by the band rule.
    """
    out = _decode(str(path), data, lambda im: _pil_grey(im, max_side), max_side)
    if isinstance(out, tuple):
        return _checked(out[0]), out[1], out[2]
    a = _checked(out)
    return _shrink(grey(bands_to_rgb(a)), max_side), 1 if a.ndim == 2 else a.shape[2], a.shape[:2]


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode one image file to HxWx3 uint8 by the band rule, or raise UnreadableImage."""
    return bands_to_rgb(load_array(path, data))


def _pil_bytes(im: Image.Image) -> int:
    """Bytes PIL's decode of `im` takes (modes deeper than 8 bits: 2 or 4 bytes a sample)."""
    depth = 4 if im.mode in ("I", "F", "RGBX") else 2 if im.mode.startswith("I;16") else 1
    return im.size[0] * im.size[1] * len(im.getbands()) * depth


def _pil_fit(im: Image.Image, fit: int) -> np.ndarray:
    """A large image shrunk before it becomes an array: a JPEG decoded by the DCT at 1/2..1/8
    scale (draft), anything else box-reduced by PIL after its decode (PIL decodes whole)."""
    if _pil_bytes(im) <= LARGE_RASTER:
        return _pil_to_array(im)
    (w, h), k = im.size, _fit_step(*im.size, fit)
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        im.draft(im.mode, (w // min(k, 8), h // min(k, 8)) if k > 1 else None)
        k = _fit_step(*im.size, fit)
    im.load()
    if k > 1:
        try:
            im = im.reduce(k)
        except (ValueError, NotImplementedError):  # a mode PIL cannot reduce: read whole
            pass
    return _pil_to_array(im)


def load_sized(path: str | os.PathLike, size: int, data: bytes | None = None) -> np.ndarray:
    """size x size RGB uint8 by the band rule: resize(load_rgb(path, data), size), the reader of
    every stage that resizes (embedding, training latents, downstream, report tiles).

    An image of at most LARGE_RASTER bytes decoded gives exactly that. A larger one is first
    shrunk by an integer factor, keeping its smaller side at least FIT_MARGIN * size, without
    ever holding the whole raster: a TIFF by block means read strip by strip (or tile by tile),
    a JPEG by a reduced-scale DCT decode, others by PIL's box reduce after their decode; a
    stretch of deeper-than-8-bit data is then computed on the shrunk copy.
    """
    out = _decode(str(path), data, lambda im: _pil_fit(im, int(size)), fit=int(size))
    return resize(bands_to_rgb(_checked(out)), int(size))


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file's header, nothing decoded; or raise UnreadableImage."""
    path = str(path)
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            try:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages.first
                    return page.imagelength, page.imagewidth
            except Exception:  # not every .tif is a TIFF tifffile reads; let PIL try
                pass
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:
        raise UnreadableImage(_reason(e)) from None


def _reason(e: Exception) -> str:
    """`Type: first line of the message`, the same from run to run: object addresses (PIL
    names the BytesIO it was given) become the object's type name."""
    msg = _ADDRESS.sub(r"<\1>", str(e).splitlines()[0] if str(e) else "")
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
