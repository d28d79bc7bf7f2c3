"""Stage 5b: choose samples inside one cluster.

`nearest` (representativeness): closest to the centroid first; `farthest`: the reverse (hard
examples); `spread`: farthest-point
traversal from the most central sample (diversity); `cover`: greedy facility location, each next
sample the one that most raises the members' similarity to their nearest chosen sample
(representativeness: an outlier covers only itself); `random`: a seeded permutation. All
skip a candidate whose cosine similarity to an already taken member reaches `dedup` (a
near-duplicate), and fall back to the skipped ones, in order, only if the quota is not met:
the quota is always filled exactly. Ties break by id.
"""
from __future__ import annotations

import numpy as np

PREFIX = ("spread", "cover")  # greedy orders: the first `quota` positions are computed, the rest only on demand


def candidate_order(emb: np.ndarray, dist: np.ndarray, ids: np.ndarray, mode: str, rng,
                    limit: int | None = None) -> np.ndarray:
    """Positions in the order the mode prefers them; `spread` stops after `limit` positions (the
    traversal's prefix: the full order starts with exactly these)."""
    by_dist = np.lexsort((ids, dist))
    if mode == "nearest":
        return by_dist
    if mode == "farthest":  # the "hard" end: least prototypical first
        return np.lexsort((ids, -dist))
    if mode == "random":
        return np.lexsort((ids, rng.random(len(ids))))
    if mode == "cover":
        return _cover(emb, ids, min(len(ids), limit or len(ids)))
    if mode == "spread":
        order = [by_dist[0]]
        mind = 1.0 - emb @ emb[by_dist[0]]
        mind[by_dist[0]] = -np.inf
        for _ in range(min(len(ids), limit or len(ids)) - 1):
            best = np.flatnonzero(mind == mind.max())
            j = best[np.argmin(ids[best])] if len(best) > 1 else best[0]
            order.append(j)
            mind = np.minimum(mind, 1.0 - emb @ emb[j])
            mind[order] = -np.inf
        return np.asarray(order)
    raise ValueError(f"unknown within-cluster mode {mode!r}; choose nearest, farthest, spread, cover or random")


def _cover(emb: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """The first `n` positions of the greedy facility-location order (cosine similarity, floored
    at 0): O(n x members^2), members of one cluster (about `clustering.cluster_size`)."""
    sim = np.maximum(emb @ emb.T, 0.0)
    best = np.zeros(len(ids), sim.dtype)
    order, left = [], np.ones(len(ids), bool)
    for _ in range(n):
        gain = np.maximum(sim - best[:, None], 0.0).sum(0)
        gain[~left] = -np.inf
        top = np.flatnonzero(gain == gain.max())
        j = top[np.argmin(ids[top])]  # ties by id
        order.append(j)
        left[j] = False
        best = np.maximum(best, sim[:, j])
    return np.asarray(order, np.int64)


def pick(emb: np.ndarray, dist: np.ndarray, ids: np.ndarray, quota: int, mode: str, dedup: float, rng,
         core: float = 1.0):
    """(chosen positions, positions skipped as near-duplicates and not chosen).

    `core` < 1 picks among the `core` share of the cluster nearest its centroid (never fewer
    than the quota): representativeness beside the mode's diversity, so a spread pick does
    not reach for the cluster's outliers (blurred, hazy or cut tiles sit at its edge).
    """
    if 0 < core < 1 and quota < len(ids):
        n_core = max(quota, int(np.ceil(core * len(ids))))
        if n_core < len(ids):
            sub = np.sort(np.lexsort((ids, dist))[:n_core])
            got, dup = pick(emb[sub], dist[sub], ids[sub], quota, mode, dedup, rng)
            return sub[got], sub[dup]
    if quota <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if quota >= len(ids):  # all of it (`random` still draws its permutation: the seed stream is kept)
        everything = np.arange(len(ids)) if mode in PREFIX else candidate_order(emb, dist, ids, mode, rng)
        return np.sort(everything).astype(np.int64), np.zeros(0, np.int64)
    # The farthest-point traversal costs a pass per position: take its first `quota` positions,
    # and the whole order only when near-duplicates were skipped (the same result either way).
    order = candidate_order(emb, dist, ids, mode, rng, quota if mode in PREFIX else None)
    taken, skipped = _walk(emb, order, quota, dedup)
    if len(taken) < quota and len(order) < len(ids):
        order = candidate_order(emb, dist, ids, mode, rng)
        taken, skipped = _walk(emb, order, quota, dedup)
    fill = quota - len(taken)
    taken += skipped[:fill]
    return np.asarray(taken, np.int64), np.asarray(skipped[fill:], np.int64)


def _walk(emb: np.ndarray, order: np.ndarray, quota: int, dedup: float) -> tuple[list, list]:
    """Take candidates in order until the quota, skipping near-duplicates of those taken."""
    taken, skipped = [], []
    for i in order:
        if len(taken) == quota:
            break
        if dedup < 1.0 and taken and float((emb[taken] @ emb[i]).max()) >= dedup:
            skipped.append(i)
        else:
            taken.append(i)
    return taken, skipped
