"""Baseline: a uniform random subset of the readable, unique images (no entropy filter)."""
from __future__ import annotations

import numpy as np

NEEDS = ()


def select(pool, budget: int, cfg, rng):
    # Sort ids first so the draw does not depend on the order files were found in.
    order = np.argsort(pool.ids, kind="stable")
    return order[rng.permutation(len(order))[:budget]], {}
