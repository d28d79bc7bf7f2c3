"""Baseline: scenes kept in proportion to their size, a seeded random draw inside each scene.

Stratified random sampling on the reference scenes: RS-Prune without cluster uniformity and
without representatives.
"""
from __future__ import annotations

import numpy as np

from prune.budget import waterfill

NEEDS = ("embed", "scenes")


def select(pool, budget: int, cfg, rng):
    scenes, sizes = np.unique(pool.scene, return_counts=True)
    quotas = waterfill(sizes, sizes.astype(float), budget)
    order = np.argsort(pool.ids, kind="stable")  # independent of file discovery order
    draw = rng.random(len(pool))
    chosen = []
    for s, q in zip(scenes, quotas):
        rows = order[pool.scene[order] == s]
        chosen.append(rows[np.argsort(draw[rows], kind="stable")[:q]])
    return np.concatenate(chosen), {}
