"""Stage 5a: the budget and its exact integer split (water-filling).

B = round((1 - ratio) * N), N counting every file found. Groups (scenes, then clusters) get
shares proportional to weights; a group whose capacity is under its share gives all it has and
the rest is shared again among the others. Rounding is by largest remainder with ties to the
lower index, so the split is deterministic and sums exactly to min(B, total capacity).
"""
from __future__ import annotations

import numpy as np


def budget(n_total: int, ratio: float) -> int:
    """Number of rows to keep. Python's round (half to even), as the manifest states."""
    return int(round((1.0 - ratio) * n_total))


def waterfill(capacity, weights, total: int) -> np.ndarray:
    """Integer allocation a <= capacity, sum(a) = min(total, sum(capacity)), a ~ weights."""
    cap = np.asarray(capacity, np.int64)
    w = np.asarray(weights, np.float64)
    if cap.ndim != 1 or w.shape != cap.shape:
        raise ValueError("capacity and weights must be 1-d of the same length")
    total = int(min(total, cap.sum()))
    alloc = np.zeros(len(cap), np.float64)
    active = (cap > 0) & (w > 0)
    if not active.any():  # nobody has weight: share by capacity instead
        active, w = cap > 0, cap.astype(np.float64)
    left = float(total)
    # Continuous water-filling: saturate groups whose share exceeds their capacity, repeat.
    while left > 1e-9 and active.any():
        share = left * w * active / w[active].sum()
        over = active & (alloc + share >= cap)
        if not over.any():
            alloc += share
            break
        left -= (cap[over] - alloc[over]).sum()
        alloc[over] = cap[over]
        active &= ~over
    # Integer rounding by largest remainder, never past capacity.
    out = np.minimum(np.floor(alloc + 1e-9).astype(np.int64), cap)
    rest = total - int(out.sum())
    if rest > 0:
        frac = np.where(out < cap, alloc - out, -np.inf)
        order = np.lexsort((np.arange(len(cap)), -frac))  # largest remainder, then lower index
        for i in order:
            if rest == 0:
                break
            if out[i] < cap[i]:
                out[i] += 1
                rest -= 1
    return out


def scene_weights(sizes, alpha: float) -> np.ndarray:
    """Scene weights size**alpha: 0 = uniform over scenes, 1 = proportional to their size."""
    sizes = np.asarray(sizes, np.float64)
    return np.where(sizes > 0, sizes ** alpha, 0.0)
