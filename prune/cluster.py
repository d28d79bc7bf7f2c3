"""Stage 4: stratified clustering inside each scene stratum.

Within a stratum of n images, k-means (faiss, spherical) is fitted on a random sample of
max(min_sample, fraction * n) members (all of them when the stratum is small) and every
member is then assigned to its nearest centroid in batches. `refine` Lloyd steps over all
members follow (centroid = normalised mean of its members, then assign again), for one more
assignment pass each: at 10^6 synthetic points one step took the k-means objective of a 25%
sample fit from 1.03x to 1.00x that of a fit on every member (benchmarks/kmeans_sample.py).
The number of clusters follows the stratum size: `k_rule=size` gives round(n / cluster_size),
`k_rule=sqrt` gives round(sqrt_scale * sqrt(n)); both clipped to [1, max_k].

`cluster_stage` is the cached wrapper the pipeline calls, keyed by the embedding store, the
strata, the pool's content, the `clustering` config and the seed.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rsprune.cache import cached_table, stable_hash
from rsprune.knn import kmeans, search
from rsprune.layout import CACHE_CLUSTERS, cache_path


def n_clusters(n: int, rule: str, cluster_size: float, sqrt_scale: float, max_k: int) -> int:
    if rule == "size":
        k = round(n / cluster_size)
    elif rule == "sqrt":
        k = round(sqrt_scale * math.sqrt(n))
    else:
        raise ValueError(f"unknown clustering.k_rule {rule!r}; choose size or sqrt")
    return int(max(1, min(k, max_k, n)))


def member_means(x: np.ndarray, label: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Spherical Lloyd update: each centroid becomes the unit mean of its members (one sparse
    k x n product, no n x k matrix); a centroid with no members keeps its place."""
    import scipy.sparse as sp

    k, n = len(centroids), len(x)
    sums = np.asarray(sp.csr_matrix((np.ones(n, np.float32), (label, np.arange(n))), shape=(k, n)) @ x)
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norm > 0, sums / np.maximum(norm, 1e-12), centroids).astype(np.float32)


def cluster_stratum(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int,
                    refine: int = 0):
    """Cluster one stratum: (label per row, cosine distance to its centroid, centroids)."""
    n = len(x)
    m = min(n, max(int(min_sample), int(math.ceil(fraction * n)), k))
    rng = np.random.default_rng(seed)
    sample = x if m == n else x[np.sort(rng.choice(n, m, replace=False))]
    centroids, _ = kmeans(sample, k, seed=seed, niter=niter, spherical=True)
    sim, idx = search(centroids, x, 1)
    for _ in range(refine if m < n else 0):  # a fit on every member has nothing left to refine
        centroids = member_means(x, idx[:, 0], centroids)
        sim, idx = search(centroids, x, 1)
    return idx[:, 0], (1.0 - sim[:, 0]).astype(np.float32), centroids


def stratified_clusters(emb: np.ndarray, strata: np.ndarray, cfg, seed: int, progress: bool = False):
    """Cluster every stratum. Returns global cluster ids (consecutive over strata, ordered by
    stratum), centroid distances, and a per-cluster table (cluster, stratum, size)."""
    cluster = np.full(len(emb), -1, np.int64)
    dist = np.full(len(emb), np.nan, np.float32)
    info, offset = [], 0
    from tqdm import tqdm

    for s in tqdm(np.unique(strata), desc="clusters", unit="stratum", disable=not progress, leave=False):
        rows = np.flatnonzero(strata == s)
        k = n_clusters(len(rows), cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale, cfg.max_k)
        lab, d, _ = cluster_stratum(emb[rows], k, cfg.sample_fraction, cfg.min_sample, cfg.niter,
                                    seed + int(s) + 1, int(cfg.refine))
        cluster[rows] = lab + offset
        dist[rows] = d
        sizes = np.bincount(lab, minlength=k)
        info += [(offset + c, int(s), int(sizes[c])) for c in range(k)]
        offset += k
    return cluster, dist, info


def cluster_stage(emb: np.ndarray, strata: np.ndarray, ids, hashes: list[str], embed_key: str, clustering_cfg,
                  seed: int, cache_dir: str, progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """(table id -> cluster, centroid_distance in pool order; was cached) for the pool rows
    with embeddings `emb`, stratum labels `strata`, ids and content hashes."""
    key = stable_hash("clusters", embed_key, strata.tolist(), hashes, OmegaConf.to_container(clustering_cfg), seed)

    def compute():
        c, d, _ = stratified_clusters(emb, strata, clustering_cfg, seed, progress)
        return pd.DataFrame({"id": ids, "cluster": c, "centroid_distance": d})

    return cached_table(cache_path(cache_dir, CACHE_CLUSTERS, f"{key}.parquet"), key, compute)
