"""Baseline: the images with the highest local entropy (stage 1 alone, pushed to the budget)."""
from __future__ import annotations

import numpy as np

NEEDS = ()


def select(pool, budget: int, cfg, rng):
    order = np.lexsort((pool.ids, -pool.table["entropy_local"].to_numpy()))
    return order[:budget], {}
