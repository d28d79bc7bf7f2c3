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


def group_medians(key: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row, the median of the finite `x` of its `key` group (NaN where a group has none):
    one sort, no Python step per group."""
    order = np.lexsort((np.nan_to_num(x, nan=np.inf), key))
    k, xs = key[order], x[order]
    start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    n = np.add.reduceat(np.isfinite(xs).astype(np.int64), start)
    lo, hi = start + np.maximum(n - 1, 0) // 2, start + n // 2
    med = np.where(n > 0, (xs[lo] + xs[np.minimum(hi, len(xs) - 1)]) / 2, np.nan)
    out = np.empty(len(x))
    out[order] = np.repeat(med, np.diff(np.r_[start, len(xs)]))
    return out


def dull_members(cluster: np.ndarray, sharp: np.ndarray, z: float) -> np.ndarray:
    """Per row, whether its stage-1 sharpness (prune/entropy.py) lies more than `z` robust
    deviations (1.4826 x the median absolute deviation) below its cluster's median: a blurred or
    hazy view beside sharp views of the same scene. Relative to the cluster, so a smooth scene
    (sea, desert) is measured against its own kind, not against the corpus. NaN: not dull."""
    s = np.asarray(sharp, np.float64)
    med = group_medians(cluster, s)
    mad = 1.4826 * group_medians(cluster, np.abs(s - med))
    with np.errstate(invalid="ignore"):
        return (mad > 0) & (s < med - z * mad)


def late_rows(pool, sel) -> np.ndarray | None:
    """`selection.dull_z`'s dull members of the pool (None: off), counted in the summary."""
    if sel.dull_z is None:
        return None
    late = dull_members(pool.cluster, pool.table["entropy_sharpness"].to_numpy(np.float64), float(sel.dull_z))
    pool.extra["dull_members"] = int(late.sum())
    return late


def pick_clusters(emb, dist: np.ndarray, ids: np.ndarray, cluster: np.ndarray, quotas: dict[int, int], within: str,
                  dedup: float, rng, core: float = 1.0, late: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill each cluster's quota with `pick`, clusters in id order: (chosen rows, rows skipped
    as near-duplicates). Rows marked `late` (dull_members) are picked from only when the
    others cannot fill the quota (near-duplicates are then checked within each part)."""
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], sorted(quotas) + [np.inf])
    chosen, dups = [], []
    for i, c in enumerate(sorted(quotas)):
        rows = order[bounds[i]:bounds[i + 1]]
        x = emb[rows].astype(np.float32, copy=False)  # a float16 pool is widened one cluster at a time
        first = np.ones(len(rows), bool) if late is None else ~late[rows]
        q = quotas[c]
        for part in (np.flatnonzero(first), np.flatnonzero(~first)):
            if len(part) and q > 0:
                got, dup = pick(x[part], dist[rows[part]], ids[rows[part]], min(q, len(part)), within, dedup, rng, core)
                q -= len(got)
                chosen.append(rows[part[got]])
                dups.append(rows[part[dup]])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return cat(chosen), cat(dups)


def _pick_task(item, within: str, dedup: float, core: float):
    x, dist, ids, cluster, quotas, late = item
    rng = np.random.default_rng(0)  # not drawn from: within=random is refused off the local engine
    return pick_clusters(materialize(x), dist, ids, cluster, quotas, within, dedup, rng, core, late)


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


def pick_by_quota(pool, quotas: dict[int, int], within: str, dedup: float, rng, core: float = 1.0,
                  late: np.ndarray | None = None):
    """Fill each cluster's quota with `pick`; near-duplicates skipped get their own reason. Off
    the local engine, each group of whole clusters (cluster_groups) is one task."""
    if pool.engine is LOCAL:
        chosen, dups = pick_clusters(pool.emb, pool.dist, pool.ids, pool.cluster, quotas, within, dedup, rng, core, late)
    else:
        groups = cluster_groups(pool.scene, pool.cluster)
        members = group_rows(groups)
        items = ((pool.emb[m], pool.dist[m], pool.ids[m], pool.cluster[m],
                  {int(c): quotas[int(c)] for c in np.unique(pool.cluster[m])}, None if late is None else late[m])
                 for m in members)
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
    return pick_by_quota(pool, quotas, str(sel.within), float(sel.dedup), rng, float(sel.core), late_rows(pool, sel))
