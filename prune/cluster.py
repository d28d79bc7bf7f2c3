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

from prune import state
from prune.state import LOCAL, materialize, partitions
from rsprune.cache import cached_table, rows_digest, save_npy, stable_hash, verified
from rsprune.errors import warn
from rsprune.knn import kmeans, search
from rsprune.layout import CACHE_CLUSTERS, cache_path


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


def member_sums(x: np.ndarray, label: np.ndarray, k: int, chunk: int = 1 << 14) -> np.ndarray:
    """(k, d) float32 sum of each centroid's members: sparse k x n products, no n x k matrix. Rows
    are widened a chunk at a time (a float16 stratum is never copied whole to float32); each
    chunk's product starts from the sums so far (an identity block in front), so every sum adds
    its members in row order, the bits of one product over all rows."""
    import scipy.sparse as sp

    sums = np.zeros((k, x.shape[1]), np.float32)
    for s in range(0, len(x), chunk):
        part = np.asarray(x[s:s + chunk], np.float32)
        m = len(part)
        a = sp.csr_matrix((np.ones(k + m, np.float32), (np.r_[np.arange(k), label[s:s + chunk]], np.arange(k + m))),
                          shape=(k, k + m))
        sums = np.asarray(a @ np.concatenate([sums, part]))
    return sums


def unit_means(sums: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norm > 0, sums / np.maximum(norm, 1e-12), centroids).astype(np.float32)


def member_means(x: np.ndarray, label: np.ndarray, centroids: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """Spherical Lloyd update: each centroid becomes the unit mean of its members; a centroid
    with no members keeps its place."""
    return unit_means(member_sums(x, label, len(centroids), chunk), centroids)


def fit_sample(n: int, k: int, fraction: float, min_sample: int, seed: int) -> np.ndarray | None:
    """The sorted rows a stratum's k-means is fitted on; None: all of them."""
    m = min(n, max(int(min_sample), int(math.ceil(fraction * n)), k))
    return None if m == n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def cluster_stratum(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int,
                    refine: int = 0, max_k: int | None = None):
    """Cluster one stratum: (label per row, cosine distance to its centroid, centroids); over
    `max_k` clusters, in two levels (split_cells)."""
    if max_k is not None and k > max_k:
        return split_cells(x, k, fraction, min_sample, niter, seed, refine, int(max_k))
    sample = fit_sample(len(x), k, fraction, min_sample, seed)
    centroids, _ = kmeans(x if sample is None else x[sample], k, seed=seed, niter=niter, spherical=True)
    sim, idx = search(centroids, x, 1)
    for _ in range(refine if sample is not None else 0):  # a fit on every member has nothing left to refine
        centroids = member_means(x, idx[:, 0], centroids)
        sim, idx = search(centroids, x, 1)
    return idx[:, 0], (1.0 - sim[:, 0]).astype(np.float32), centroids


def _fit_task(item, niter: int):
    x, k, seed = item
    return kmeans(materialize(x), k, seed=seed, niter=niter, spherical=True)[0]


def _nearest_task(item):
    x, centroids = item
    return search(centroids, materialize(x), 1)[1][:, 0]


def _sums_task(item):
    x, label, k = item
    return member_sums(materialize(x), label, k)


def cell_labels(emb, members: list, cells: list, seeds: list, fraction: float, min_sample: int, niter: int,
                refine: int, engine=LOCAL, tag: str = "cells", whole: bool = False) -> list[np.ndarray]:
    """The first level of split_cells for each big stratum (rows `emb[members[i]]`): a flat k-means
    into cells[i], fitted on its sample, each row to its nearest cell, and `refine` Lloyd steps;
    the assignment and the member sums go partition by partition (state.partitions, the sums
    added in partition order), so no task holds a stratum (`whole`: one partition a stratum, as
    inside a task). Each step is one map of `engine`."""
    samples = [fit_sample(len(m), c, fraction, min_sample, s) for m, c, s in zip(members, cells, seeds)]
    fits = ((emb[m if smp is None else m[smp]], c, s) for m, c, s, smp in zip(members, cells, seeds, samples))
    cents = list(engine.map(functools.partial(_fit_task, niter=int(niter)), fits, f"{tag}-fit"))
    parts = [(i, p) for i, m in enumerate(members) for p in ([slice(0, len(m))] if whole else partitions(len(m)))]
    labels = [None] * len(members)

    def assign(todo, step):
        got = engine.map(_nearest_task, ((emb[members[i][p]], cents[i]) for i, p in parts if i in todo), step)
        for i, p, lab in zip(*zip(*[(i, p) for i, p in parts if i in todo]), got):
            labels[i] = lab if p.start == 0 else np.concatenate([labels[i], lab])

    assign(set(range(len(members))), f"{tag}-assign")
    todo = {i for i, smp in enumerate(samples) if smp is not None}  # a fit on every member: nothing to refine
    for r in range(refine if todo else 0):
        sums = {}
        work = ((emb[members[i][p]], labels[i][p], len(cents[i])) for i, p in parts if i in todo)
        for (i, _), part in zip([ip for ip in parts if ip[0] in todo], engine.map(_sums_task, work, f"{tag}-sums{r}")):
            sums[i] = part if i not in sums else sums[i] + part
        for i in todo:
            cents[i] = unit_means(sums[i], cents[i])
        assign(todo, f"{tag}-assign{r + 1}")
    return labels


def cell_units(cell: np.ndarray, k: int, cells: int, seed: int, max_k: int) -> list[tuple]:
    """(rows, clusters, seed, max_k) of each non-empty cell, in order: its share round(k * n_cell / n)
    of the k clusters (at least 1). A cell holding every row (the split found no structure) is
    fitted flat, capped at max_k (no endless recursion)."""
    n, units = len(cell), []
    for j in range(cells):
        rows = np.flatnonzero(cell == j)
        if not len(rows):
            continue
        kj = int(min(len(rows), max(1, round(k * len(rows) / n))))
        if len(rows) == n:
            warn(f"a stratum of {n} rows did not split into cells: {max_k} clusters, not {k}")
            kj = min(kj, max_k)
        units.append((rows, kj, seed + 7919 * (j + 1), max_k if len(rows) < n else None))
    return units


def assemble(n: int, units: list, results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One stratum's (label, distance, centroids) from its cells' results, cluster ids cell after cell."""
    label, dist, cents, offset = np.empty(n, np.int64), np.empty(n, np.float32), [], 0
    for (rows, *_), (lab, d, cj) in zip(units, results):
        label[rows], dist[rows] = lab + offset, d
        cents.append(cj)
        offset += len(cj)
    return label, dist, np.concatenate(cents)


def split_cells(x: np.ndarray, k: int, fraction: float, min_sample: int, niter: int, seed: int, refine: int,
                max_k: int):
    """k clusters of a stratum too large for one fit: ceil(k / max_k) cells (cell_labels), then
    each cell clustered with its share of the k clusters (cell_units), cells in order."""
    cells = math.ceil(k / max_k)
    if cells > max_k:  # more cells than one fit takes: the cell level is itself split
        cell = cluster_stratum(x, cells, fraction, min_sample, niter, seed, refine, max_k)[0]
    else:
        cell = cell_labels(x, [np.arange(len(x))], [cells], [seed], fraction, min_sample, niter, refine, whole=True)[0]
    units = cell_units(cell, k, cells, seed, max_k)
    results = (cluster_stratum(x[rows], kj, fraction, min_sample, niter, s, refine, mk) for rows, kj, s, mk in units)
    return assemble(len(x), units, results)


def _stratum_task(item, cfg: dict):
    """One unit's (label, distance, centroids): `item` = (its rows, k, seed, max_k), rows in pool order."""
    x, k, seed, max_k = item
    return cluster_stratum(materialize(x), k, cfg["sample_fraction"], cfg["min_sample"], cfg["niter"], seed,
                           int(cfg["refine"]), max_k)


def stratified_clusters(emb: np.ndarray, strata: np.ndarray, cfg, seed: int, progress: bool = False,
                        with_centroids: bool = False, engine=LOCAL, tag: str = "clusters"):
    """Cluster every stratum. Returns global cluster ids (consecutive over strata, ordered by
    stratum), centroid distances, a per-cluster table (cluster, stratum, size), and with
    `with_centroids` the (k, d) centroids, row = global cluster id. A stratum needing more than
    max_k clusters gets its cells first (cell_labels, over partitions), then each cell is one task
    of `engine` (prune/state.py), as each other stratum is; `emb[rows]` is what a task gets (an
    engine's lazy rows or an array)."""
    cluster = np.full(len(emb), -1, np.int64)
    dist = np.full(len(emb), np.nan, np.float32)
    info, offset, cents = [], 0, []
    from tqdm import tqdm

    ids = np.unique(strata)
    members = {int(s): np.flatnonzero(strata == s) for s in ids}
    conf = {key: getattr(cfg, key) for key in ("sample_fraction", "min_sample", "niter", "refine", "max_k")}
    max_k = None if cfg.max_k is None else int(cfg.max_k)
    ks = {int(s): n_clusters(len(members[int(s)]), cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale) for s in ids}
    big = [s for s in ks if max_k is not None and max_k < ks[s] <= max_k * max_k]
    ncell = {s: math.ceil(ks[s] / max_k) for s in big}
    labels = cell_labels(emb, [members[s] for s in big], [ncell[s] for s in big], [seed + s + 1 for s in big],
                         float(cfg.sample_fraction), int(cfg.min_sample), int(cfg.niter), int(cfg.refine), engine,
                         f"{tag}-cells") if big else []
    units = {int(s): [(None, ks[int(s)], seed + int(s) + 1, max_k)] for s in ids}
    units |= {s: cell_units(lab, ks[s], ncell[s], seed + s + 1, max_k) for s, lab in zip(big, labels)}
    items = ((emb[members[s] if rows is None else members[s][rows]], kj, sj, mk)
             for s in units for rows, kj, sj, mk in units[s])
    results = iter(engine.map(functools.partial(_stratum_task, cfg=conf), items, tag))
    for s in tqdm(ids, desc="clusters", unit="stratum", disable=not progress, leave=False):
        rows, mine = members[int(s)], units[int(s)]
        got = [next(results) for _ in mine]
        lab, d, cent_s = got[0] if mine[0][0] is None else assemble(len(rows), mine, got)
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
                      seed, {"part": state.PART}, *(() if engine is LOCAL else (engine.name,)))  # engine=ray: its own table
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
