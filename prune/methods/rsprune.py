"""RS-Prune selection: scene quotas, uniform cluster quotas, representatives inside clusters.

The budget is split over scenes by weights size**alpha (water-filled), then uniformly over the
clusters of each scene (water-filled: a small cluster gives all it has), then each cluster gives
its quota by `selection.within` (nearest to the centroid by default), skipping near-duplicates.
"""
from __future__ import annotations

import numpy as np

from prune.budget import scene_weights, waterfill
from prune.selection import pick

NEEDS = ("embed", "scenes", "clusters")


def cluster_quotas(scene: np.ndarray, cluster: np.ndarray, budget: int, alpha: float) -> dict[int, int]:
    """Quota per cluster id: scenes by size**alpha, clusters uniform inside a scene."""
    scenes, scene_sizes = np.unique(scene, return_counts=True)
    per_scene = waterfill(scene_sizes, scene_weights(scene_sizes, alpha), budget)
    quotas = {}
    for s, q in zip(scenes, per_scene):
        cl, sizes = np.unique(cluster[scene == s], return_counts=True)
        for c, qc in zip(cl, waterfill(sizes, np.ones(len(sizes)), int(q))):
            quotas[int(c)] = int(qc)
    return quotas


def pick_by_quota(pool, quotas: dict[int, int], within: str, dedup: float, rng):
    """Fill each cluster's quota with `pick`; near-duplicates skipped get their own reason."""
    ids = pool.ids
    order = np.argsort(pool.cluster, kind="stable")
    bounds = np.searchsorted(pool.cluster[order], sorted(quotas) + [np.inf])
    chosen, notes = [], {}
    for i, c in enumerate(sorted(quotas)):
        rows = order[bounds[i]:bounds[i + 1]]
        got, dup = pick(pool.emb[rows], pool.dist[rows], ids[rows], quotas[c], within, dedup, rng)
        chosen.append(rows[got])
        notes.update({int(r): "pruned_near_duplicate" for r in rows[dup]})
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64), notes


def select(pool, budget: int, cfg, rng):
    sel = cfg.selection
    quotas = cluster_quotas(pool.scene, pool.cluster, budget, float(sel.alpha))
    return pick_by_quota(pool, quotas, str(sel.within), float(sel.dedup), rng)
