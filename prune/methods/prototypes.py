"""Baseline: self-supervised prototype distance (Sorscher et al., 2022), without scenes.

Global k-means; each image is scored by its cosine distance to its centroid; keep the `hard`
(farthest) or `easy` (nearest) end of the ranking (`method.keep`). Ties break by id.
"""
from __future__ import annotations

import numpy as np

from rsprune.cli import UsageError

NEEDS = ("embed", "clusters")


def select(pool, budget: int, cfg, rng):
    keep = str(cfg.method.keep)
    if keep not in ("hard", "easy"):
        raise UsageError(f"method.keep must be hard or easy, got {keep!r}")
    sign = -1.0 if keep == "hard" else 1.0
    return np.lexsort((pool.ids, sign * pool.dist))[:budget], {}
