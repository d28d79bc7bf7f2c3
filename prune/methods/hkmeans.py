"""Baseline: hierarchical k-means with balanced sampling down the hierarchy (Vo et al., 2024,
"Automatic data curation for self-supervised learning", facebookresearch/ssl-data-curation),
written here from the paper's description.

Level 1 is the global k-means of the clustering stage (k = n / cluster_size). Each higher level
clusters the unit centroids of the level below (spherical k-means, k divided by
`method.branching`), for `method.levels` levels in all, so a dense region of the corpus is one
node high up however many images it holds. The budget is split top-down: uniformly over the
top nodes (water-filled: a node holding fewer images than its share gives all it has), then
uniformly over each node's children, down to the level-1 clusters, which give their quota by
`method.within` (random, as that paper samples inside the leaves). No labels, no reference.
"""
from __future__ import annotations

import numpy as np

from prune.budget import waterfill
from prune.methods.rsprune import pick_by_quota
from rsprune.knn import kmeans, normalize, search

NEEDS = ("embed", "clusters")


def leaf_centroids(pool) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids, unit centroid per cluster): the k-means centroids when the run kept them."""
    cl, inv = np.unique(pool.cluster, return_inverse=True)
    if pool.centroids is not None:
        return cl, normalize(np.asarray(pool.centroids, np.float32)[cl])
    sums = np.zeros((len(cl), pool.emb.shape[1]), np.float32)
    np.add.at(sums, inv, pool.emb)
    return cl, normalize(sums)


def hierarchy(centroids: np.ndarray, levels: int, branching: float, seed: int) -> list[np.ndarray]:
    """parents[l][i]: the level-(l+2) node of level-(l+1) node i, for each level above the leaves."""
    parents, x = [], centroids
    for lv in range(levels - 1):
        k = int(round(len(x) / branching))
        if k < 2:
            break
        c, _ = kmeans(x, k, seed=seed + lv, spherical=True)
        parents.append(search(c, x, 1)[1][:, 0].astype(np.int64))
        x = normalize(c)
    return parents


def balanced_quotas(sizes: np.ndarray, parents: list[np.ndarray], budget: int) -> np.ndarray:
    """Quota per leaf: water-filled uniformly over the nodes of each level, top-down."""
    caps = [np.asarray(sizes, np.int64)]
    for p in parents:  # subtree sizes, bottom-up
        caps.append(np.bincount(p, weights=caps[-1], minlength=p.max() + 1).astype(np.int64))
    quota = waterfill(caps[-1], np.ones(len(caps[-1])), budget)
    for lv in range(len(parents) - 1, -1, -1):  # top-down: each node shares its quota among its children
        child = np.zeros(len(caps[lv]), np.int64)
        for node in np.flatnonzero(quota):
            kids = np.flatnonzero(parents[lv] == node)
            child[kids] = waterfill(caps[lv][kids], np.ones(len(kids)), int(quota[node]))
        quota = child
    return quota


def select(pool, budget: int, cfg, rng):
    m = cfg.method
    cl, cent = leaf_centroids(pool)
    sizes = np.bincount(np.searchsorted(cl, pool.cluster), minlength=len(cl))
    parents = hierarchy(cent, int(m.levels), float(m.branching), int(cfg.seed))
    quotas = dict(zip(cl.tolist(), balanced_quotas(sizes, parents, budget).tolist()))
    pool.extra["hkmeans_nodes_per_level"] = [len(cl)] + [int(p.max()) + 1 for p in parents]
    return pick_by_quota(pool, quotas, str(m.within), float(m.dedup), rng)
