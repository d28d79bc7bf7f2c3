"""Stage 1: the entropy filter (local information content).

Scores are Shannon entropies in bits of 256-bin grey-level histograms: `global` over the whole
image, `local` the mean over a grid x grid of patches. Local is the default score: a half-clouded
or half-sea tile has a wide global histogram but its flat patches score near zero.
The cut is chosen late: scores are computed once in the index pass, the threshold here.
"""
from __future__ import annotations

import functools

import numpy as np


def histogram_entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy (bits) of histograms along the last axis (the reference form of `entropies`)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    logp = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(axis=-1)


@functools.lru_cache(maxsize=32)
def _patches(h: int, w: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, 256 x its patch number (so label + grey value is a histogram bin), and the
    pixel count of each patch. Patches cut the image at rounded multiples of H/grid and W/grid,
    so every pixel counts once."""
    rows = np.repeat(np.arange(grid), np.diff(np.linspace(0, h, grid + 1).round().astype(int)))
    cols = np.repeat(np.arange(grid), np.diff(np.linspace(0, w, grid + 1).round().astype(int)))
    label = (rows[:, None] * grid + cols[None, :]).astype(np.intp).ravel() * 256
    return label, np.bincount(label // 256, minlength=grid * grid).astype(np.float64)


_XLOG2X = np.zeros(1)
_TABLE_MAX = 1 << 20  # 8 MB at most: counts of larger images take the logs directly


def _xlog2x(counts: np.ndarray, n: int) -> np.ndarray:
    """c * log2(c) (0 at 0) of counts no larger than n, from a table grown on demand."""
    global _XLOG2X
    if n > _TABLE_MAX:
        c = counts.astype(np.float64)
        return c * np.log2(np.maximum(c, 1))
    if len(_XLOG2X) <= n:
        c = np.arange(min(max(n + 1, 2 * len(_XLOG2X)), _TABLE_MAX + 1), dtype=np.float64)
        _XLOG2X = c * np.log2(np.maximum(c, 1))
    return _XLOG2X[counts]


def entropies(grey: np.ndarray, grid: int = 4) -> tuple[float, float]:
    """(global, local) entropy in bits of a uint8 image from one bincount: the grid x grid patch
    histograms, whose sum is the global one. H = log2(n) - sum(c log2 c) / n per histogram."""
    h, w = grey.shape
    grid = max(1, min(grid, h, w))
    label, sizes = _patches(h, w, grid)
    counts = np.bincount(label + grey.ravel(), minlength=grid * grid * 256).reshape(grid * grid, 256)
    n = h * w
    local = np.log2(sizes) - _xlog2x(counts, n).sum(axis=1) / sizes
    glob = np.log2(n) - _xlog2x(counts.sum(axis=0), n).sum() / n
    # Clip the last-ulp negatives of flat images to the exact 0 they are.
    return max(float(glob), 0.0), max(float(local.mean()), 0.0)


def coverage_sharpness(grey: np.ndarray, grid: int = 8, flat_bits: float = 1.0,
                       bright: float = 205.0) -> tuple[float, float]:
    """(area, sharpness) of a uint8 grey image: what a mean of patch entropies cannot see.

    - area: the share of grid x grid patches that carry information: entropy at least
      `flat_bits` (not no-data fill or flat water) and mean grey under `bright` (not cloud
      top). A tile half under cloud or behind a swath edge covers half an area.
    - sharpness: the 90th percentile over the patches of the entropy (bits) of the local grey
      differences |dx| + |dy|: the information at the finest scale in the tile's sharpest
      parts. Blur and haze lower it everywhere; a beach or a desert keeps a shoreline or
      ripples somewhere, which a whole-tile measure would average away.
    """
    h, w = grey.shape
    grid = max(1, min(grid, h - 1, w - 1)) if min(h, w) > 1 else 1
    label, sizes = _patches(h, w, grid)
    g = grey.ravel()
    counts = np.bincount(label + g, minlength=grid * grid * 256).reshape(grid * grid, 256)
    ent = np.log2(sizes) - _xlog2x(counts, h * w).sum(axis=1) / sizes
    mean = np.bincount(label // 256, weights=g.astype(np.float64), minlength=grid * grid) / sizes
    area = float(((ent >= flat_bits) & (mean < bright)).mean())
    if h < 2 or w < 2:
        return area, 0.0
    gi = grey.astype(np.int16)
    d = np.minimum(np.abs(np.diff(gi, axis=1))[:-1, :] + np.abs(np.diff(gi, axis=0))[:, :-1], 255)
    dl, dsizes = _patches(h - 1, w - 1, grid)
    dc = np.bincount(dl + d.ravel(), minlength=grid * grid * 256).reshape(grid * grid, 256)
    dent = np.log2(dsizes) - _xlog2x(dc, d.size).sum(axis=1) / dsizes
    return area, float(np.quantile(dent, 0.9))


def global_entropy(grey: np.ndarray) -> float:
    """Entropy (bits) of the grey-level histogram of a uint8 image."""
    return entropies(grey, 1)[0]


def local_entropy(grey: np.ndarray, grid: int = 4) -> float:
    """Mean entropy (bits) over a grid x grid partition of a uint8 image."""
    return entropies(grey, grid)[1]


def entropy_cut(scores: np.ndarray, floor: float, percentile: float) -> float:
    """The threshold: the larger of an absolute floor (bits) and a corpus percentile.

    `scores` holds only readable, non-duplicate images; NaN-free.
    """
    if scores.size == 0:
        return float(floor)
    pct = float(np.percentile(scores, percentile)) if percentile > 0 else -np.inf
    return float(max(floor, pct))


def entropy_filter(scores: np.ndarray, eligible: np.ndarray, floor: float, percentile: float,
                   area=None, min_area: float = 0.0, sharpness=None, min_sharpness=None, cut=None):
    """Keep mask and threshold: eligible rows whose score reaches the cut, whose informative
    area reaches `min_area` and whose sharpness reaches `min_sharpness` (None: not checked).
    `cut`: entropy_cut's value when an engine computed it apart (prune/engine_ray_index.py)."""
    cut = entropy_cut(scores[eligible], floor, percentile) if cut is None else cut
    keep = eligible & (scores >= cut)
    if area is not None and min_area > 0:
        keep &= np.nan_to_num(area, nan=0.0) >= min_area
    if sharpness is not None and min_sharpness is not None:
        keep &= np.nan_to_num(sharpness, nan=-np.inf) >= min_sharpness
    return keep, cut


def stage1_pool(score: np.ndarray, usable: np.ndarray, ids: np.ndarray, floor: float, percentile: float,
                filtered: bool, budget: int, **checks):
    """Stage 1 for a method: (kept mask, cut, pool rows, top-up rows).

    The pool is the stage-1 survivors when the method filters (`filtered`), else every usable
    row. When the cut leaves fewer than `budget`, the highest-entropy dropped rows return as a
    top-up (ties by id), so the budget is still met.
    """
    kept, cut = entropy_filter(score, usable, floor, percentile, **checks)
    pool_rows = np.flatnonzero(kept if filtered else usable)
    extra = np.zeros(0, np.int64)
    if len(pool_rows) < budget:
        extra = np.flatnonzero(usable & ~(kept if filtered else usable))
        extra = extra[np.lexsort((ids[extra], -score[extra]))][:budget - len(pool_rows)]
    return kept, cut, pool_rows, extra
