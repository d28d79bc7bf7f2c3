"""Baseline: density-based cluster quotas (Abbas et al., 2024, "Effective pruning of web-scale
datasets based on complexity of concept clusters").

Global k-means; each cluster's complexity is d_intra * d_inter, where d_intra is the mean cosine
distance of its members to its centroid and d_inter the mean cosine distance of its centroid to
the `method.neighbours` nearest other centroids. Quotas are water-filled with weights
softmax(complexity / `method.temperature`); inside a cluster the `method.within` end is kept
(farthest = hard examples, as that paper pairs its quotas with prototype-distance pruning).
"""
from __future__ import annotations

import numpy as np

from prune.budget import waterfill
from prune.methods.rsprune import pick_by_quota
from rsprune.knn import normalize, search

NEEDS = ("embed", "clusters")


def complexity(emb: np.ndarray, cluster: np.ndarray, dist: np.ndarray, neighbours: int):
    """(cluster ids, sizes, d_intra * d_inter) per cluster."""
    cl, inv, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    d_intra = np.bincount(inv, weights=dist) / sizes
    sums = np.zeros((len(cl), emb.shape[1]))
    np.add.at(sums, inv, emb)
    centroids = normalize(sums)  # the members' mean direction: the spherical k-means centroid
    k = min(neighbours + 1, len(cl))
    if k < 2:
        return cl, sizes, d_intra
    sim, _ = search(centroids, centroids, k)
    d_inter = (1.0 - sim[:, 1:]).mean(axis=1)  # column 0 is the centroid itself
    return cl, sizes, d_intra * d_inter


def select(pool, budget: int, cfg, rng):
    m = cfg.method
    cl, sizes, c = complexity(pool.emb, pool.cluster, pool.dist, int(m.neighbours))
    z = c / max(float(m.temperature), 1e-12)
    w = np.exp(z - z.max())
    quotas = dict(zip(cl.tolist(), waterfill(sizes, w / w.sum(), budget).tolist()))
    return pick_by_quota(pool, quotas, str(m.within), float(cfg.selection.dedup), rng)
