"""Baseline: one global k-means (no scenes), uniform quotas over clusters, `selection.within` inside.

RS-Prune without its scene strata: the same clustering rule and in-cluster pick, so the
difference measures what the reference benchmark adds.
"""
from __future__ import annotations

import numpy as np

from prune.methods.rsprune import late_rows, pick_by_quota
from prune.budget import waterfill

NEEDS = ("embed", "clusters")  # "clusters" without "scenes": one stratum


def select(pool, budget: int, cfg, rng):
    cl, sizes = np.unique(pool.cluster, return_counts=True)
    quotas = dict(zip(cl.tolist(), waterfill(sizes, np.ones(len(sizes)), budget).tolist()))
    return pick_by_quota(pool, quotas, str(cfg.selection.within), float(cfg.selection.dedup), rng,
                         float(cfg.selection.core), late_rows(pool, cfg.selection))
