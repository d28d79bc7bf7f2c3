"""Stage 5a': how much of the embedding space each image stands for (its local volume).

A scene's quota can follow its image count (`selection.mass=count`) or the volume its images
cover (`volume`): each image stands for a ball whose radius r is its mean distance to its k
nearest neighbours, of volume ~ r^D in D intrinsic dimensions (the k-NN density estimate,
inverted). A scene of many near-identical images (a corpus that over-samples one scene type)
then weighs what its spread is worth, not its count, which is how a label-free quota can push
an imbalanced corpus towards balance (issue 14's evidence: README).

`auto` lets the corpus say which of the two it needs. If a stratum is large because its scene
was over-sampled, its images are packed tighter, so the volume per image falls as the count
rises (log-log slope -1); if strata differ in how spread their scenes are, volume per image and
count are unrelated (slope 0). beta = -slope, clipped to [0, 1] and fitted over the strata, sets
the mass n * (V / n)^beta between count (beta 0) and volume (beta 1), and the quota exponent
alpha + (1 - alpha) * beta: quotas follow the mass more closely the more of the imbalance the
mass already explains. A heuristic of ours, chosen on two corpora (README, issue 14).

Neighbours are searched inside the image's own k-means cluster (clusters hold ~40 images), so
the cost is O(N x cluster size x d) and needs no global index at 1e6 images. D is estimated by
the Levina-Bickel maximum-likelihood rule on the same neighbour distances (MacKay-Ghahramani
pooling: the inverse of the mean inverse estimate), or fixed by `selection.volume.dim`.
"""
from __future__ import annotations

import functools

import numpy as np

from prune.state import LOCAL, materialize

BLOCK = 2048  # rows per similarity block inside one cluster: memory O(BLOCK x cluster size)


def neighbour_distances(emb: np.ndarray, cluster: np.ndarray, k: int) -> np.ndarray:
    """(N, k) chordal distances |x - y| of each unit row to its k nearest rows of the same
    cluster, ascending; NaN where the cluster has fewer than j + 1 other members. float32: the
    similarities' own precision, so the steps below widen a chunk to float64 with no change in
    value (half the bytes: 0.4 instead of 0.8 GB at 10^7 x 10)."""
    out = np.full((len(emb), k), np.nan, np.float32)
    order = np.argsort(cluster, kind="stable")
    cuts = np.flatnonzero(np.diff(cluster[order])) + 1
    for rows in np.split(order, cuts):
        m = min(k, len(rows) - 1)
        if m < 1:
            continue
        x = emb[rows].astype(np.float32)
        for s in range(0, len(rows), BLOCK):
            sim = x[s:s + BLOCK] @ x.T
            sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf  # not its own neighbour
            top = -np.sort(-np.partition(sim, -m, axis=1)[:, -m:], axis=1)  # m largest, descending
            out[rows[s:s + BLOCK], :m] = np.sqrt(np.clip(2.0 - 2.0 * top, 0.0, None))
    return out


ROWS = 1 << 18  # rows per chunk of the per-row steps below: temporaries O(ROWS x k), not O(N x k)


def _row_chunks(n: int):
    return (slice(s, s + ROWS) for s in range(0, n, ROWS))


def _inverse_dims(dist: np.ndarray) -> np.ndarray:
    """Per row, 1 / m_i of the Levina-Bickel rule (NaN where the row does not qualify)."""
    dist = np.asarray(dist, np.float64)
    finite = np.isfinite(dist)
    k = finite.sum(axis=1)
    ok = (k >= 3) & (np.where(finite, dist, 1.0).min(axis=1, initial=1.0) > 0)
    out = np.full(len(dist), np.nan)
    if ok.any():
        d, k = dist[ok], k[ok]
        last = d[np.arange(len(d)), k - 1]
        logs = np.where(np.isfinite(d), np.log(last[:, None] / np.where(np.isfinite(d), d, 1.0)), 0.0)
        out[ok] = logs.sum(axis=1) / (k - 1)  # the k-th term is log 1 = 0
    return out


def _radius(dist: np.ndarray) -> np.ndarray:
    """Per row r, the mean neighbour distance (NaN without neighbours), in row chunks."""
    r = np.empty(len(dist))
    for c in _row_chunks(len(dist)):
        d = np.asarray(dist[c], np.float64)
        n = np.isfinite(d).sum(axis=1)
        r[c] = np.where(n > 0, np.nansum(d, axis=1) / np.maximum(n, 1), np.nan)
    return r


def neighbour_stats(emb: np.ndarray, cluster: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row (1 / m_i of the Levina-Bickel rule, NaN where it does not qualify; r): all the
    volume step needs of the neighbour distances. A row's values depend on its cluster alone, so
    any set of whole clusters (a stratum) gives its rows the same values."""
    dist = neighbour_distances(emb, cluster, int(k))
    inv = np.concatenate([_inverse_dims(dist[c]) for c in _row_chunks(len(dist))] or [np.zeros(0)])
    return inv, _radius(dist)


def dim_of(inv: np.ndarray) -> float:
    """1 / mean(1 / m_i) over the rows that qualify (pool order); NaN when none does."""
    inv = inv[np.isfinite(inv)]
    return float(1.0 / inv.mean()) if len(inv) else float("nan")


def intrinsic_dim(dist: np.ndarray) -> float:
    """Levina-Bickel MLE of the intrinsic dimension from (N, k) ascending neighbour distances
    (NaN past a small cluster's members): per row over the k_i >= 3 neighbours it has, all at a
    positive distance; pooled as 1 / mean(1 / m_i). NaN when no row qualifies. Rows are taken
    in chunks (each row's value does not depend on the others)."""
    return dim_of(np.concatenate([_inverse_dims(dist[c]) for c in _row_chunks(len(dist))] or [np.zeros(0)]))


def radius_volumes(r: np.ndarray, dim: float) -> np.ndarray:
    """Per row (r / median r)^dim; 1 where r is missing or 0, or no row has a radius."""
    good = np.isfinite(r) & (r > 0)
    if not good.any():
        return np.ones(len(r))
    rel = np.where(good, r / np.median(r[good]), 1.0)
    return np.exp(np.clip(dim * np.log(rel), -700.0, 700.0))  # scale-free, no overflow at high dim


def image_volumes(dist: np.ndarray, dim: float) -> np.ndarray:
    """Per row (r / median r)^dim, r = mean neighbour distance. A row without neighbours (a
    singleton cluster) or at distance 0 (a near-duplicate pair) gets the median's volume, 1."""
    return radius_volumes(_radius(dist), dim)


def _stats_task(item, k: int):
    x, cluster = item
    return neighbour_stats(materialize(x), cluster, k)


def group_rows(groups: np.ndarray) -> list[np.ndarray]:
    """The rows of each group, ascending, groups in order."""
    order = np.argsort(groups, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(groups[order])) + 1) if len(order) else []


def grouped_stats(emb, cluster: np.ndarray, k: int, groups: np.ndarray, engine, tag: str):
    """`neighbour_stats` with one task of `engine` per group of whole clusters."""
    inv, r = np.full(len(cluster), np.nan), np.full(len(cluster), np.nan)
    members = group_rows(groups)
    results = engine.map(functools.partial(_stats_task, k=int(k)), ((emb[m], cluster[m]) for m in members), tag)
    for m, (inv_m, r_m) in zip(members, results):
        inv[m], r[m] = inv_m, r_m
    return inv, r


def volumes(emb: np.ndarray, cluster: np.ndarray, k: int, dim, groups: np.ndarray | None = None,
            engine=LOCAL, tag: str = "volumes") -> tuple[np.ndarray, dict]:
    """(per-row volume, what summary.json records: k, dim and how it was set). With `groups`
    (whole clusters each), the neighbour step runs as one task per group."""
    if groups is None:
        inv, r = neighbour_stats(emb, cluster, int(k))
    else:
        inv, r = grouped_stats(emb, cluster, int(k), groups, engine, tag)
    if dim == "auto":
        d, rule = dim_of(inv), "Levina-Bickel MLE"
        if not np.isfinite(d):  # no cluster with 4+ members: nothing to measure, every image weighs 1
            d, rule = 0.0, "none: no cluster has 4 or more members"
    else:
        d, rule = float(dim), "fixed"
    v = radius_volumes(r, d)
    spread = np.quantile(v, [0.05, 0.5, 0.95]).tolist()
    return v, {"k": int(k), "dim": d, "dim_rule": rule, "volume_p5_p50_p95": spread}


def oversampling_fit(n: np.ndarray, vol: np.ndarray, min_stratum: int) -> tuple[float, float] | None:
    """(slope, intercept) of the least-squares line of log(volume per image) on log(count) over the
    strata with at least `min_stratum` images; None when fewer than 3 such strata (no evidence)."""
    n, vol = np.asarray(n, np.float64), np.asarray(vol, np.float64)
    ok = (n >= min_stratum) & (vol > 0)
    if ok.sum() < 3 or np.ptp(np.log(n[ok])) == 0:
        return None
    slope, intercept = np.polyfit(np.log(n[ok]), np.log(vol[ok] / n[ok]), 1)
    return float(slope), float(intercept)


def beta_of(line: tuple[float, float] | None) -> float:
    """beta in [0, 1]: minus the fit's slope, clipped; 0 without evidence."""
    return 0.0 if line is None else float(np.clip(-line[0], 0.0, 1.0))


def scene_mass(scene: np.ndarray, v: np.ndarray, mode: str, alpha: float, min_stratum: int):
    """(per-row weight whose sum over a stratum is its mass, quota exponent, what to record).
    count: 1 per row; volume: v; auto: n * (V / n)^beta, exponent alpha + (1 - alpha) * beta
    (an alpha above 1 is kept as given). `auto` records the fit's inputs per stratum."""
    if mode == "count":
        return np.ones(len(scene)), alpha, {}
    if mode == "volume":
        return v, alpha, {}
    ids, inv, n = np.unique(scene, return_inverse=True, return_counts=True)
    per = np.bincount(inv, weights=v, minlength=len(n)) / n  # volume per image of each stratum
    line = oversampling_fit(n, per * n, min_stratum)
    beta = beta_of(line)
    eff = alpha + (1.0 - alpha) * beta if alpha <= 1 else alpha
    fit = {"oversampling_beta": beta, "alpha_effective": eff, "min_stratum": int(min_stratum),
           "fit_slope_intercept": None if line is None else list(line),  # the line report/scene_mass.png draws
           "strata": ids.tolist(), "stratum_images": n.tolist(), "stratum_volume_per_image": per.tolist()}
    return (per ** beta)[inv], eff, fit
