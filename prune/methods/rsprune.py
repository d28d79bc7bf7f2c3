"""RS-Prune selection: scene quotas, uniform cluster quotas, representatives inside clusters.

The budget is split over scenes by weights mass**alpha (water-filled), where a scene's mass is
its image count (`selection.mass=count`), the embedding volume its images cover (`volume`), or
between the two as far as the corpus looks over-sampled (`auto`; prune/volume.py); then
uniformly over the clusters of each scene (water-filled: a small cluster gives all it has);
then each cluster gives its quota by `selection.within`, skipping near-duplicates.
"""
from __future__ import annotations

import numpy as np

from prune.budget import scene_weights, waterfill
from prune.selection import pick
from prune.volume import stratum_mass, volumes
from rsprune.exact import parts_total, sum_parts

NEEDS = ("embed", "scenes", "clusters")


def cluster_quotas(scene: np.ndarray, cluster: np.ndarray, budget: int, alpha: float,
                   mass: np.ndarray | None = None) -> dict[int, int]:
    """Quota per cluster id: scenes by mass**alpha (mass: per-row weights summed over the scene;
    None = one per row, the scene's size), clusters uniform inside a scene."""
    scenes, inverse, scene_sizes = np.unique(scene, return_inverse=True, return_counts=True)
    masses = scene_sizes if mass is None else parts_total(sum_parts(mass, inverse, len(scenes)), len(scenes))
    cl, first, sizes = np.unique(cluster, return_index=True, return_counts=True)
    return quotas_from_counts(scene_sizes, masses, cl, np.searchsorted(scenes, scene[first]), sizes, budget, alpha)


def quotas_from_counts(scene_sizes, masses, clusters, cluster_scene, cluster_sizes, budget: int,
                       alpha: float) -> dict[int, int]:
    """`cluster_quotas` from per-stratum and per-cluster statistics only (memory O(clusters), what
    engine=ray reduces to the driver): strata by index 0..S-1, each cluster's stratum index."""
    per_scene = waterfill(scene_sizes, scene_weights(masses, alpha), budget)
    order = np.lexsort((clusters, cluster_scene))
    cuts = np.searchsorted(cluster_scene[order], np.arange(len(per_scene) + 1))
    quotas = {}
    for s, q in enumerate(per_scene):
        rows = order[cuts[s]:cuts[s + 1]]
        for c, qc in zip(clusters[rows], waterfill(cluster_sizes[rows], np.ones(len(rows)), int(q))):
            quotas[int(c)] = int(qc)
    return quotas


def pick_by_quota(pool, quotas: dict[int, int], within: str, dedup: float, rng, core: float = 1.0):
    """Fill each cluster's quota with `pick`; near-duplicates skipped get their own reason."""
    ids = pool.ids
    order = np.argsort(pool.cluster, kind="stable")
    bounds = np.searchsorted(pool.cluster[order], sorted(quotas) + [np.inf])
    chosen, notes = [], {}
    for i, c in enumerate(sorted(quotas)):
        rows = order[bounds[i]:bounds[i + 1]]
        got, dup = pick(pool.emb[rows], pool.dist[rows], ids[rows], quotas[c], within, dedup, rng, core)
        chosen.append(rows[got])
        notes.update({int(r): "pruned_near_duplicate" for r in rows[dup]})
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64), notes


def select(pool, budget: int, cfg, rng):
    sel = cfg.selection
    alpha = float(sel.alpha)
    scenes, inverse, sizes = np.unique(pool.scene, return_inverse=True, return_counts=True)
    masses = sizes
    if sel.mass != "count":
        v, info = volumes(pool.emb, pool.cluster, int(sel.volume.k), sel.volume.dim)
        vsum = parts_total(sum_parts(v, inverse, len(scenes)), len(scenes))
        masses, alpha, fit = stratum_mass(scenes, sizes, vsum, str(sel.mass), alpha, int(sel.volume.min_stratum))
        pool.extra["volume"] = {"mass": str(sel.mass), **info, **fit}
    cl, first, csizes = np.unique(pool.cluster, return_index=True, return_counts=True)
    quotas = quotas_from_counts(sizes, masses, cl, inverse[first], csizes, budget, alpha)
    return pick_by_quota(pool, quotas, str(sel.within), float(sel.dedup), rng, float(sel.core))
