"""Baseline: SemDeDup (Abbas et al., 2023): within-cluster semantic de-duplication to the budget.

Inside each k-means cluster, members are ordered from the farthest to the nearest to the
centroid (SemDeDup keeps the least prototypical of a duplicate group); each member's duplicate
score is its highest cosine similarity to a member earlier in that order. SemDeDup removes every
member whose score exceeds 1 - eps; since the scores do not depend on eps, searching eps so the
budget is met exactly is the same as keeping the `budget` lowest scores (ties by id).
"""
from __future__ import annotations

import numpy as np

NEEDS = ("embed", "clusters")
BLOCK = 1024  # rows per similarity block: memory stays O(BLOCK * cluster size)


def duplicate_scores(emb: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Max cosine similarity to any member earlier in farthest-first order (-1 for the first)."""
    order = np.lexsort((ids, -dist))
    x = emb[order]
    score = np.empty(len(x), np.float32)
    for s in range(0, len(x), BLOCK):
        e = min(s + BLOCK, len(x))
        sim = x[s:e] @ x[:e].T
        sim[np.arange(e)[None, :] >= np.arange(s, e)[:, None]] = -1.0  # only earlier members count
        score[s:e] = sim.max(axis=1)
    out = np.empty_like(score)
    out[order] = score
    return out


def select(pool, budget: int, cfg, rng):
    score = np.empty(len(pool), np.float32)
    for c in np.unique(pool.cluster):
        rows = np.flatnonzero(pool.cluster == c)
        score[rows] = duplicate_scores(pool.emb[rows], pool.dist[rows], pool.ids[rows])
    eps = 1.0 - float(np.sort(score)[budget - 1]) if budget else 0.0
    pool.extra["semdedup_eps"] = eps  # the eps SemDeDup would need for this budget
    return np.lexsort((pool.ids, score))[:budget], {}
