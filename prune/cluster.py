"""Stage 4: stratified clustering inside each scene stratum.

Within a stratum of n images, k-means (faiss, spherical) is fitted on a sample of about
max(min_sample, fraction * n) members (all of them when the stratum is small), in the
stratum's row order, and every member is then assigned to its nearest centroid. The sample is
drawn by a seeded hash of each member's key (its content hash), not by its position, so a
partitioned run (engine=ray, prune/engine_ray.py) draws the same members without a global order. `refine` Lloyd steps over all
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

from rsprune.cache import cached_table, save_npy, stable_hash, verified
from rsprune.exact import hash_keys, mix64
from rsprune.knn import kmeans, nearest
from rsprune.layout import CACHE_CLUSTERS, cache_path


def n_clusters(n: int, rule: str, cluster_size: float, sqrt_scale: float, max_k: int) -> int:
    if rule == "size":
        k = round(n / cluster_size)
    elif rule == "sqrt":
        k = round(sqrt_scale * math.sqrt(n))
    else:
        raise ValueError(f"unknown clustering.k_rule {rule!r}; choose size or sqrt")
    return int(max(1, min(k, max_k, n)))


def sample_mask(keys: np.ndarray, m: int, n: int, seed: int) -> np.ndarray:
    """Members in the k-means sample: each with probability m / n, by a seeded hash of its key."""
    if m >= n:
        return np.ones(len(keys), bool)
    return mix64(keys, seed) < np.uint64(min(int(m / n * 2.0 ** 64), 2 ** 64 - 1))


def sample_size(n: int, k: int, fraction: float, min_sample: int) -> int:
    return min(n, max(int(min_sample), int(math.ceil(fraction * n)), k))


def member_means(x: np.ndarray, label: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Spherical Lloyd update: each centroid becomes the unit mean of its members (one sparse
    k x n product, no n x k matrix); a centroid with no members keeps its place."""
    return unit_means(member_sums(x, label, len(centroids)), centroids)


def member_sums(x: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float32 sums of each label's rows, added in row order (one sparse product): a
    cluster's sum is the same bits computed over the stratum or over that cluster alone."""
    import scipy.sparse as sp

    n = len(x)
    return np.asarray(sp.csr_matrix((np.ones(n, np.float32), (label, np.arange(n))), shape=(k, n)) @ x)


def unit_means(sums: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norm > 0, sums / np.maximum(norm, 1e-12), centroids).astype(np.float32)


def cluster_stratum(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int,
                    refine: int = 0, keys: np.ndarray | None = None):
    """Cluster one stratum: (label per row, cosine distance to its centroid, centroids).
    `keys` (uint64 per row, default the row numbers) draw the sample."""
    n = len(x)
    m = sample_size(n, k, fraction, min_sample)
    keys = np.arange(n, dtype=np.uint64) if keys is None else keys
    sample = x if m == n else x[sample_mask(keys, m, n, seed)]
    centroids, _ = kmeans(sample, k, seed=seed, niter=niter, spherical=True)
    sim, idx = nearest(centroids, x)
    for _ in range(refine if m < n else 0):  # a fit on every member has nothing left to refine
        centroids = member_means(x, idx, centroids)
        sim, idx = nearest(centroids, x)
    return idx, (1.0 - sim).astype(np.float32), centroids


def stratified_clusters(emb: np.ndarray, strata: np.ndarray, cfg, seed: int, progress: bool = False,
                        with_centroids: bool = False, keys: np.ndarray | None = None):
    """Cluster every stratum. Returns global cluster ids (consecutive over strata, ordered by
    stratum), centroid distances, a per-cluster table (cluster, stratum, size), and with
    `with_centroids` the (k, d) centroids, row = global cluster id. `keys`: per row, what
    draws the k-means samples (content-hash keys; default the row numbers)."""
    keys = np.arange(len(emb), dtype=np.uint64) if keys is None else keys
    cluster = np.full(len(emb), -1, np.int64)
    dist = np.full(len(emb), np.nan, np.float32)
    info, offset, cents = [], 0, []
    from tqdm import tqdm

    for s in tqdm(np.unique(strata), desc="clusters", unit="stratum", disable=not progress, leave=False):
        rows = np.flatnonzero(strata == s)
        k = n_clusters(len(rows), cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale, cfg.max_k)
        lab, d, cent_s = cluster_stratum(emb[rows], k, cfg.sample_fraction, cfg.min_sample, cfg.niter,
                                         seed + int(s) + 1, int(cfg.refine), keys[rows])
        cluster[rows] = lab + offset
        dist[rows] = d
        sizes = np.bincount(lab, minlength=k)
        info += [(offset + c, int(s), int(sizes[c])) for c in range(k)]
        cents.append(cent_s)
        offset += k
    if with_centroids:
        return cluster, dist, info, (np.concatenate(cents) if cents else np.zeros((0, emb.shape[1]), np.float32))
    return cluster, dist, info


def cluster_stage(emb: np.ndarray, strata: np.ndarray, ids, hashes: list[str], embed_key: str, clustering_cfg,
                  seed: int, cache_dir: str, progress: bool = False) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """(table id -> cluster, centroid_distance in pool order; centroids, row = cluster id; was
    cached) for the pool rows with embeddings `emb`, stratum labels `strata`, ids and content
    hashes. The centroids (`<key>.centroids.npy`, checksummed, written before the table) are what
    density's d_inter and hkmeans's upper levels read; a table without valid centroids is
    computed again."""
    key = stable_hash("clusters-v2", embed_key, strata.tolist(), hashes, OmegaConf.to_container(clustering_cfg), seed)
    path = cache_path(cache_dir, CACHE_CLUSTERS, f"{key}.parquet")
    cpath = path.with_name(f"{key}.centroids.npy")
    if path.exists() and not verified(cpath):
        path.unlink()

    def compute():
        c, d, _, cent = stratified_clusters(emb, strata, clustering_cfg, seed, progress, with_centroids=True,
                                             keys=hash_keys(hashes))
        save_npy(cpath, cent, checksum=True)
        return pd.DataFrame({"id": ids, "cluster": c, "centroid_distance": d})

    table, was_cached = cached_table(path, key, compute)
    cent = np.load(cpath, allow_pickle=False)
    if len(table) and len(cent) != int(table.cluster.max()) + 1:
        raise RuntimeError(f"{cpath} does not match its cluster table; delete both to recompute")
    return table, cent, was_cached
