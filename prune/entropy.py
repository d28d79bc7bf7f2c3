"""Stage 1: the entropy filter (local information content).

Scores are Shannon entropies in bits of 256-bin grey-level histograms: `global` over the whole
image, `local` the mean over a grid x grid of patches. Local is the default score: a half-clouded
or half-sea tile has a wide global histogram but its flat patches score near zero.
The cut is chosen late: scores are computed once in the index pass, the threshold here.
"""
from __future__ import annotations

import numpy as np


def histogram_entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy (bits) of histograms along the last axis."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    logp = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(axis=-1)


def global_entropy(grey: np.ndarray) -> float:
    """Entropy (bits) of the grey-level histogram of a uint8 image."""
    return float(histogram_entropy(np.bincount(grey.ravel(), minlength=256)))


def local_entropy(grey: np.ndarray, grid: int = 4) -> float:
    """Mean entropy (bits) over a grid x grid partition of a uint8 image.

    Patches are the image cut at rounded multiples of H/grid and W/grid, so every pixel counts
    once; all patch histograms come from one bincount.
    """
    h, w = grey.shape
    grid = max(1, min(grid, h, w))
    rows = np.repeat(np.arange(grid), np.diff(np.linspace(0, h, grid + 1).round().astype(int)))
    cols = np.repeat(np.arange(grid), np.diff(np.linspace(0, w, grid + 1).round().astype(int)))
    patch = rows[:, None] * grid + cols[None, :]
    counts = np.bincount((patch * 256 + grey).ravel(), minlength=grid * grid * 256)
    return float(histogram_entropy(counts.reshape(grid * grid, 256)).mean())


def entropy_cut(scores: np.ndarray, floor: float, percentile: float) -> float:
    """The threshold: the larger of an absolute floor (bits) and a corpus percentile.

    `scores` holds only readable, non-duplicate images; NaN-free.
    """
    if scores.size == 0:
        return float(floor)
    pct = float(np.percentile(scores, percentile)) if percentile > 0 else -np.inf
    return float(max(floor, pct))


def entropy_filter(scores: np.ndarray, eligible: np.ndarray, floor: float, percentile: float):
    """Keep mask and threshold: eligible rows whose score reaches the cut."""
    cut = entropy_cut(scores[eligible], floor, percentile)
    return eligible & (scores >= cut), cut
