"""Baseline: density-based cluster quotas (Abbas et al., 2024, "Effective pruning of web-scale
datasets based on complexity of concept clusters"), following the released code by default.

Global k-means; each cluster's complexity is d_intra * d_inter, where d_intra is the mean cosine
distance of its members to its centroid and d_inter the mean cosine distance of its k-means
centroid to the `method.neighbours` nearest other centroids (`method.d_inter=centroids`; the
members' re-averaged mean direction with `member_means`). Cluster shares are
softmax(complexity / `method.temperature`) (0.5 in the released code); quotas solve the
reference's QP with a per-cluster minimum of `method.min_share * B / k` (`method.quotas=qp`,
prune/budget.py:qp_quotas), or are water-filled with no minimum (`waterfill`). The budget is
met exactly either way. Inside a cluster the `method.within` end is kept (farthest = hard
examples, the released code's default order).
"""
from __future__ import annotations

import numpy as np

from prune.budget import qp_quotas, waterfill
from prune.methods.rsprune import pick_by_quota
from rsprune.cli import UsageError
from rsprune.knn import normalize, search

NEEDS = ("embed", "clusters")


def complexity(emb: np.ndarray, cluster: np.ndarray, dist: np.ndarray, neighbours: int,
               centroids: np.ndarray | None = None):
    """(cluster ids, sizes, d_intra * d_inter) per cluster. `centroids` (rows indexed by cluster
    id) are the k-means centroids; None re-averages the members' directions instead."""
    cl, inv, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    d_intra = np.bincount(inv, weights=dist) / sizes
    if centroids is None:
        sums = np.zeros((len(cl), emb.shape[1]))
        np.add.at(sums, inv, emb)
        cent = normalize(sums)
    else:
        cent = normalize(np.asarray(centroids, np.float32)[cl])
    k = min(neighbours + 1, len(cl))
    if k < 2:
        return cl, sizes, d_intra
    sim, _ = search(cent, cent, k)
    d_inter = (1.0 - sim[:, 1:]).mean(axis=1)  # column 0 is the centroid itself
    return cl, sizes, d_intra * d_inter


def quotas(sizes: np.ndarray, c: np.ndarray, budget: int, m) -> np.ndarray:
    z = c / max(float(m.temperature), 1e-12)
    w = np.exp(z - z.max())
    w /= w.sum()
    rule = str(m.quotas)
    if rule == "qp":
        return qp_quotas(sizes, w, budget, float(m.min_share))
    if rule == "waterfill":
        return waterfill(sizes, w, budget)
    raise UsageError(f"method.quotas must be qp or waterfill, got {rule!r}")


def select(pool, budget: int, cfg, rng):
    m = cfg.method
    which = str(m.d_inter)
    if which not in ("centroids", "member_means"):
        raise UsageError(f"method.d_inter must be centroids or member_means, got {which!r}")
    cent = pool.centroids if which == "centroids" else None
    cl, sizes, c = complexity(pool.emb, pool.cluster, pool.dist, int(m.neighbours), cent)
    q = dict(zip(cl.tolist(), quotas(sizes, c, budget, m).tolist()))
    return pick_by_quota(pool, q, str(m.within), float(cfg.selection.dedup), rng)
