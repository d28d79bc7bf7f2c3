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
    return round_to_total(alloc, cap, total)


def round_to_total(alloc: np.ndarray, cap: np.ndarray, total: int) -> np.ndarray:
    """Integers floor(alloc) topped up by largest remainder (ties to the lower index) to `total`,
    never past capacity; `alloc` must sum to `total` and lie in [0, cap]."""
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


def qp_quotas(capacity, probs, total: int, min_share: float = 0.5) -> np.ndarray:
    """Density-based pruning's cluster quotas (Abbas et al. 2024, released code): the solution of
    min ||x - total * probs||^2 s.t. sum(x) = total, lb <= x <= capacity, with the per-cluster
    minimum lb = min(int(min_share * total / k), capacity - 1). That QP is the Euclidean
    projection of the target onto a box cut by a hyperplane, x = clip(target + lam, lb, ub), so
    it is solved exactly by bisection on the scalar lam (no QP solver); then rounded to integers
    summing to `total` (the reference rounds each with rint, which can miss the budget)."""
    cap = np.asarray(capacity, np.int64)
    total = int(min(total, cap.sum()))
    target = total * np.asarray(probs, np.float64)
    floor_q = int(min_share * total / max(len(cap), 1))
    lb = np.clip(np.minimum(floor_q, cap - 1), 0, None).astype(np.float64)
    ub = cap.astype(np.float64)
    lo, hi = float((lb - target).min()), float((ub - target).max())
    for _ in range(200):  # sum(clip(target + lam)) is monotone in lam: bisection to float precision
        mid = 0.5 * (lo + hi)
        if np.clip(target + mid, lb, ub).sum() < total:
            lo = mid
        else:
            hi = mid
    alloc = np.clip(target + hi, lb, ub)
    alloc *= total / alloc.sum() if alloc.sum() > total else 1.0  # float slack at the top end only
    return round_to_total(np.minimum(alloc, ub), cap, total)


def scene_weights(sizes, alpha: float) -> np.ndarray:
    """Scene weights size**alpha: 0 = uniform over scenes, 1 = proportional to their size."""
    sizes = np.asarray(sizes, np.float64)
    return np.where(sizes > 0, sizes ** alpha, 0.0)
