"""Bounded reading of large rasters: a TIFF page decoded one strip (or tile) at a time into a
shrunk copy, so memory stays one segment plus the small result whatever the raster's size.

Two shrinks, both by an integer `step`:
- `decimated`: every step-th row and column (the entropy score's grey copy, prune/index.py);
- `box_reduced`: the mean of each step x step block (what a stage that resizes the image reads:
  an area average, so the bicubic resize that follows sees no aliasing).
"""
from __future__ import annotations

import numpy as np

LARGE_RASTER = 64 << 20  # bytes decoded: a raster larger than this is read shrunk, piece by piece


class SegmentTooLarge(Exception):
    """A raster stored in strips or tiles too large to decode in bounded memory."""


def _segments(page):
    """(band or None, y, x, rows x cols x samples array clipped to the image) per stored segment."""
    h, w = page.imagelength, page.imagewidth
    seg_bytes = int(np.prod(page.chunks)) * page.dtype.itemsize
    if seg_bytes > LARGE_RASTER:
        raise SegmentTooLarge(f"raster stored in {seg_bytes >> 20} MB strips or tiles: too large to decode "
                              f"in bounded memory (limit {LARGE_RASTER >> 20} MB)")
    for seg, (sample, _, y, x, _), _ in page.segments(maxworkers=1):
        if seg is None:  # a segment the file does not store: left at 0
            continue
        yield (sample if page.planarconfig == 2 else None), y, x, seg[0, :max(0, h - y), :max(0, w - x)]


def decimated(page, step: int) -> np.ndarray:
    """Every `step`-th row and column of a TIFF page, bands last."""
    h, w, bands = page.imagelength, page.imagewidth, page.samplesperpixel
    out = np.zeros((-(-h // step), -(-w // step), bands), page.dtype)
    for band, y, x, seg in _segments(page):
        r0, c0 = (-y) % step, (-x) % step  # first row/column of the segment on the step grid
        part = seg[r0::step, c0::step]
        oy, ox = (y + r0) // step, (x + c0) // step
        if band is not None:  # separate planes: one band per segment
            out[oy:oy + part.shape[0], ox:ox + part.shape[1], band] = part[..., 0]
        else:
            out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    return out[..., 0] if bands == 1 else out


def _block_starts(offset: int, n: int, step: int) -> np.ndarray:
    """Positions in a run of n pixels starting at image position `offset` where a block begins."""
    return np.unique(np.r_[0, np.arange((-offset) % step, n, step)])


def box_reduced(page, step: int) -> np.ndarray:
    """The mean of every step x step block of a TIFF page (edge blocks: of the pixels they hold),
    bands last, in the page's dtype (integers rounded), so the band rule treats it as the file."""
    h, w, bands = page.imagelength, page.imagewidth, page.samplesperpixel
    oh, ow = -(-h // step), -(-w // step)
    # Integer sums stay exact and skip a float copy of each segment.
    acc_type = np.int64 if np.issubdtype(page.dtype, np.integer) or page.dtype == bool else np.float64
    acc = np.zeros((oh, ow, bands), acc_type)
    for band, y, x, seg in _segments(page):
        if seg.size == 0:
            continue
        rs, cs = _block_starts(y, seg.shape[0], step), _block_starts(x, seg.shape[1], step)
        # Rows first, block by block (a contiguous sum; reduceat along rows is several times slower),
        # then columns on the few summed rows.
        ends = np.r_[rs[1:], seg.shape[0]]
        rows = np.stack([seg[a:b].sum(axis=0, dtype=acc_type) for a, b in zip(rs, ends)])
        part = np.add.reduceat(rows, cs, axis=1)
        oy, ox = (y + rs[0]) // step, (x + cs[0]) // step
        if band is not None:
            acc[oy:oy + part.shape[0], ox:ox + part.shape[1], band] += part[..., 0]
        else:
            acc[oy:oy + part.shape[0], ox:ox + part.shape[1]] += part
    n_rows = np.minimum(step, h - np.arange(oh) * step)
    n_cols = np.minimum(step, w - np.arange(ow) * step)
    mean = acc / (n_rows[:, None] * n_cols[None, :])[..., None]
    out = (np.rint(mean) if acc_type is np.int64 else mean).astype(page.dtype)
    return out[..., 0] if bands == 1 else out
