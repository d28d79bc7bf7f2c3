"""Stage 4: stratified clustering inside each scene stratum.

Within a stratum of n images, k-means (faiss, spherical) is fitted on a random sample of
max(min_sample, fraction * n) members (all of them when the stratum is small) and every
member is then assigned to its nearest centroid in batches. `refine` Lloyd steps over all
members follow (centroid = normalised mean of its members, then assign again), for one more
assignment pass each: at 10^6 synthetic points one step took the k-means objective of a 25%
sample fit from 1.03x to 1.00x that of a fit on every member (benchmarks/kmeans_sample.py).
The number of clusters follows the stratum size: `k_rule=size` gives round(n / cluster_size),
`k_rule=sqrt` gives round(sqrt_scale * sqrt(n)); both clipped to [1, n], never capped. `max_k`
is the most clusters one k-means fits: a stratum that needs k > max_k is first split into
ceil(k / max_k) cells by a k-means of its own, and each cell gets its share of the k clusters
(the same rule, so the mean cluster size stays `cluster_size` at any N). A flat fit costs
O(n x k x d) per stratum, so without the split a stratum of 10^6 would cost 25,000 centroids
per row; with it, at most about max_k + k / max_k (docs/scaling.md). `max_k=null`: always flat.

`cluster_stage` is the cached wrapper the pipeline calls, keyed by the embedding store, the
strata, the pool's content, the `clustering` config and the seed.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from prune.state import LOCAL, materialize
from rsprune.cache import cached_table, rows_digest, save_npy, stable_hash, verified
from rsprune.errors import warn
from rsprune.knn import kmeans, search
from rsprune.layout import CACHE_CLUSTERS, cache_path
from rsprune.unit_rows import RowsOf


def n_clusters(n: int, rule: str, cluster_size: float, sqrt_scale: float, max_k: int | None = None) -> int:
    """Clusters for a stratum of n by the rule, in [1, n]; `max_k` caps it (only for callers
    that want one flat fit: the pipeline splits instead, see cluster_stratum)."""
    if rule == "size":
        k = round(n / cluster_size)
    elif rule == "sqrt":
        k = round(sqrt_scale * math.sqrt(n))
    else:
        raise ValueError(f"unknown clustering.k_rule {rule!r}; choose size or sqrt")
    return int(max(1, min(k, n) if max_k is None else min(k, max_k, n)))


def split_strata(strata: np.ndarray, cfg) -> dict[int, int]:
    """{stratum: k} for the strata whose k exceeds `cfg.max_k` (what cluster_stratum splits)."""
    if cfg.max_k is None:
        return {}
    ids, n = np.unique(strata, return_counts=True)
    ks = {int(s): n_clusters(int(m), cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale) for s, m in zip(ids, n)}
    return {s: k for s, k in ks.items() if k > int(cfg.max_k)}


def member_means(x: np.ndarray, label: np.ndarray, centroids: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """Spherical Lloyd update: each centroid becomes the unit mean of its members (sparse k x n
    products, no n x k matrix); a centroid with no members keeps its place. Rows are widened
    a chunk at a time (a float16 stratum is never copied whole to float32); each chunk's product
    starts from the sums so far (an identity block in front), so every sum adds its members in
    row order, the bits of one product over all rows."""
    import scipy.sparse as sp

    k, n = len(centroids), len(x)
    sums = np.zeros((k, x.shape[1]), np.float32)
    for s in range(0, n, chunk):
        part = np.asarray(x[s:s + chunk], np.float32)
        m = len(part)
        a = sp.csr_matrix((np.ones(k + m, np.float32), (np.r_[np.arange(k), label[s:s + chunk]], np.arange(k + m))),
                          shape=(k, k + m))
        sums = np.asarray(a @ np.concatenate([sums, part]))
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norm > 0, sums / np.maximum(norm, 1e-12), centroids).astype(np.float32)


def cluster_stratum(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int,
                    refine: int = 0, max_k: int | None = None):
    """Cluster one stratum: (label per row, cosine distance to its centroid, centroids); over
    `max_k` clusters, in two levels (split_cells)."""
    if max_k is not None and k > max_k:
        return split_cells(x, k, fraction, min_sample, niter, seed, refine, int(max_k))
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


def split_cells(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int, refine: int,
                max_k: int):
    """k clusters of a stratum too large for one fit: a k-means into ceil(k / max_k) cells,
    then each cell its share round(k * n_cell / n) of the clusters (at least 1), cells in
    order. A cell holding every row (the split found no structure) is fitted flat, capped."""
    n = len(x)
    cells = math.ceil(k / max_k)
    cell, _, _ = cluster_stratum(x, cells, fraction, min_sample, niter, seed, refine, max_k)
    label = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    cents, offset = [], 0
    for j in range(cells):
        rows = np.flatnonzero(cell == j)
        if not len(rows):
            continue
        kj = int(min(len(rows), max(1, round(k * len(rows) / n))))
        if len(rows) == n:  # the split found no structure: one flat fit, capped (no endless recursion)
            warn(f"a stratum of {n} rows did not split into cells: {max_k} clusters, not {k}")
            kj = min(kj, max_k)
        lab, d, cj = cluster_stratum(x[rows], kj, fraction, min_sample, niter, seed + 7919 * (j + 1), refine,
                                     max_k if len(rows) < n else None)
        label[rows], dist[rows] = lab + offset, d
        cents.append(cj)
        offset += len(cj)
    return label, dist, np.concatenate(cents)


def _stratum_task(item, cfg: dict):
    """One stratum's (label, distance, centroids): `item` = (its rows, k, seed), rows in pool order."""
    x, k, seed = item
    return cluster_stratum(materialize(x), k, cfg["sample_fraction"], cfg["min_sample"], cfg["niter"], seed,
                           int(cfg["refine"]), None if cfg["max_k"] is None else int(cfg["max_k"]))


def stratified_clusters(emb: np.ndarray, strata: np.ndarray, cfg, seed: int, progress: bool = False,
                        with_centroids: bool = False, engine=LOCAL, tag: str = "clusters"):
    """Cluster every stratum. Returns global cluster ids (consecutive over strata, ordered by
    stratum), centroid distances, a per-cluster table (cluster, stratum, size), and with
    `with_centroids` the (k, d) centroids, row = global cluster id. Each stratum is one task of
    `engine` (prune/state.py); `emb[rows]` is what a task gets (an engine's lazy rows or an array)."""
    cluster = np.full(len(emb), -1, np.int64)
    dist = np.full(len(emb), np.nan, np.float32)
    info, offset, cents = [], 0, []
    from tqdm import tqdm

    ids = np.unique(strata)
    members = {int(s): np.flatnonzero(strata == s) for s in ids}
    conf = {key: getattr(cfg, key) for key in ("sample_fraction", "min_sample", "niter", "refine", "max_k")}
    # here a stratum is read in place, a batch at a time; another engine's task gets its lazy rows
    rows_of = (lambda m: RowsOf(emb, m)) if engine is LOCAL else (lambda m: emb[m])
    items = ((rows_of(members[int(s)]), n_clusters(len(members[int(s)]), cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale),
              seed + int(s) + 1) for s in ids)
    results = engine.map(functools.partial(_stratum_task, cfg=conf), items, tag)
    for s, (lab, d, cent_s) in tqdm(zip(ids, results), total=len(ids), desc="clusters", unit="stratum",
                                    disable=not progress, leave=False):
        rows = members[int(s)]
        k = len(cent_s)
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
                  seed: int, cache_dir: str, progress: bool = False,
                  engine=LOCAL) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """(table id -> cluster, centroid_distance in pool order; centroids, row = cluster id; was
    cached) for the pool rows with embeddings `emb`, stratum labels `strata`, ids and content
    hashes. The centroids (`<key>.centroids.npy`, checksummed, written before the table) are what
    density's d_inter and hkmeans's upper levels read; a table without valid centroids is
    computed again."""
    key = stable_hash("clusters", embed_key, rows_digest(strata, hashes), OmegaConf.to_container(clustering_cfg),
                      seed, *(() if engine is LOCAL else (engine.name,)))  # engine=ray: its own table
    path = cache_path(cache_dir, CACHE_CLUSTERS, f"{key}.parquet")
    cpath = path.with_name(f"{key}.centroids.npy")
    if path.exists() and not verified(cpath):
        path.unlink()

    def compute():
        c, d, _, cent = stratified_clusters(emb, strata, clustering_cfg, seed, progress, with_centroids=True,
                                            engine=engine, tag=f"clusters-{key}")
        save_npy(cpath, cent, checksum=True)
        return pd.DataFrame({"id": ids, "cluster": c, "centroid_distance": d})

    table, was_cached = cached_table(path, key, compute)
    cent = np.load(cpath, allow_pickle=False)
    if len(table) and len(cent) != int(table.cluster.max()) + 1:
        raise RuntimeError(f"{cpath} does not match its cluster table; delete both to recompute")
    return table, cent, was_cached
