"""RS-Prune selection: scene quotas, uniform cluster quotas, representatives inside clusters.

The budget is split over scenes by weights mass**alpha (water-filled), where a scene's mass is
its image count (`selection.mass=count`), the embedding volume its images cover (`volume`), or
between the two as far as the corpus looks over-sampled (`auto`; prune/volume.py); then
uniformly over the clusters of each scene (water-filled: a small cluster gives all it has);
then each cluster gives its quota by `selection.within`, skipping near-duplicates.
"""
from __future__ import annotations

import functools

import numpy as np

from prune.budget import scene_weights, waterfill
from prune.selection import pick
from prune import state
from prune.state import LOCAL, materialize
from prune.volume import group_rows, scene_mass, volumes

NEEDS = ("embed", "scenes", "clusters")


def cluster_quotas(scene: np.ndarray, cluster: np.ndarray, budget: int, alpha: float,
                   mass: np.ndarray | None = None) -> dict[int, int]:
    """Quota per cluster id: scenes by mass**alpha (mass: per-row weights summed over the scene;
    None = one per row, the scene's size), clusters uniform inside a scene."""
    scenes, inverse, scene_sizes = np.unique(scene, return_inverse=True, return_counts=True)
    masses = scene_sizes if mass is None else np.bincount(inverse, weights=mass, minlength=len(scenes))
    per_scene = waterfill(scene_sizes, scene_weights(masses, alpha), budget)
    quotas = {}
    for s, q in zip(scenes, per_scene):
        cl, sizes = np.unique(cluster[scene == s], return_counts=True)
        for c, qc in zip(cl, waterfill(sizes, np.ones(len(sizes)), int(q))):
            quotas[int(c)] = int(qc)
    return quotas


def pick_clusters(emb, dist: np.ndarray, ids: np.ndarray, cluster: np.ndarray, quotas: dict[int, int], within: str,
                  dedup: float, rng, core: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fill each cluster's quota with `pick`, clusters in id order: (chosen rows, rows skipped
    as near-duplicates)."""
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], sorted(quotas) + [np.inf])
    chosen, dups = [], []
    for i, c in enumerate(sorted(quotas)):
        rows = order[bounds[i]:bounds[i + 1]]
        x = emb[rows].astype(np.float32, copy=False)  # a float16 pool is widened one cluster at a time
        got, dup = pick(x, dist[rows], ids[rows], quotas[c], within, dedup, rng, core)
        chosen.append(rows[got])
        dups.append(rows[dup])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return cat(chosen), cat(dups)


def _pick_task(item, within: str, dedup: float, core: float):
    x, dist, ids, cluster, quotas = item
    rng = np.random.default_rng(0)  # not drawn from: within=random is refused off the local engine
    return pick_clusters(materialize(x), dist, ids, cluster, quotas, within, dedup, rng, core)


def cluster_groups(scene: np.ndarray, cluster: np.ndarray, part: int | None = None) -> np.ndarray:
    """Per row, its group: whole clusters of one stratum, packed in cluster order into groups of
    about `part` (default state.PART) rows (a cluster is never cut). What the off-local steps run a task per: a row's
    neighbour values and a cluster's pick depend on its cluster alone, so any grouping of whole
    clusters gives the same bits, and a stratum of any size makes tasks of bounded rows."""
    cl, first, size = np.unique(cluster, return_index=True, return_counts=True)
    order = np.lexsort((cl, scene[first]))  # clusters by (stratum, id)
    st, size = scene[first][order], size[order]
    before = np.cumsum(size) - size  # rows of the clusters before, over all strata
    new = np.r_[True, st[1:] != st[:-1]]
    base = np.maximum.accumulate(np.where(new, before, 0))  # rows before this stratum's first cluster
    key = np.stack([st, (before - base) // int(state.PART if part is None else part)], axis=1)
    _, gid = np.unique(key, axis=0, return_inverse=True)
    group = np.empty(len(cl), np.int64)
    group[order] = gid.ravel()
    return group[np.searchsorted(cl, cluster)]


def pick_by_quota(pool, quotas: dict[int, int], within: str, dedup: float, rng, core: float = 1.0):
    """Fill each cluster's quota with `pick`; near-duplicates skipped get their own reason. Off
    the local engine, each group of whole clusters (cluster_groups) is one task."""
    if pool.engine is LOCAL:
        chosen, dups = pick_clusters(pool.emb, pool.dist, pool.ids, pool.cluster, quotas, within, dedup, rng, core)
    else:
        groups = cluster_groups(pool.scene, pool.cluster)
        members = group_rows(groups)
        items = ((pool.emb[m], pool.dist[m], pool.ids[m], pool.cluster[m],
                  {int(c): quotas[int(c)] for c in np.unique(pool.cluster[m])}) for m in members)
        task = functools.partial(_pick_task, within=within, dedup=dedup, core=core)
        chosen, dups = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for m, (got, dup) in zip(members, pool.engine.map(task, items, "pick")):
            chosen, dups = np.concatenate([chosen, m[got]]), np.concatenate([dups, m[dup]])
    return chosen, {int(r): "pruned_near_duplicate" for r in dups}


def select(pool, budget: int, cfg, rng):
    sel = cfg.selection
    mass, alpha = None, float(sel.alpha)
    if sel.mass != "count":
        groups = None if pool.engine is LOCAL else cluster_groups(pool.scene, pool.cluster)  # off it: a task a group
        v, info = volumes(pool.emb, pool.cluster, int(sel.volume.k), sel.volume.dim, groups, pool.engine)
        mass, alpha, fit = scene_mass(pool.scene, v, str(sel.mass), alpha, int(sel.volume.min_stratum))
        pool.extra["volume"] = {"mass": str(sel.mass), **info, **fit}
    quotas = cluster_quotas(pool.scene, pool.cluster, budget, alpha, mass)
    return pick_by_quota(pool, quotas, str(sel.within), float(sel.dedup), rng, float(sel.core))
