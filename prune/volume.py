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

import numpy as np

from rsprune.exact import exact_mean, parts_total, sum_parts

BLOCK = 2048  # rows per similarity block inside one cluster: memory O(BLOCK x cluster size)


def neighbour_distances(emb: np.ndarray, cluster: np.ndarray, k: int) -> np.ndarray:
    """(N, k) chordal distances |x - y| of each unit row to its k nearest rows of the same
    cluster, ascending; NaN where the cluster has fewer than j + 1 other members."""
    out = np.full((len(emb), k), np.nan, np.float64)
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


def inverse_dims(dist: np.ndarray) -> np.ndarray:
    """Per qualifying row, 1 / m_i of the Levina-Bickel MLE from (N, k) ascending neighbour
    distances (NaN past a small cluster's members): rows with k_i >= 3 neighbours, all at a
    positive distance."""
    finite = np.isfinite(dist)
    k = finite.sum(axis=1)
    ok = (k >= 3) & (np.where(finite, dist, 1.0).min(axis=1, initial=1.0) > 0)
    d, k = dist[ok], k[ok]
    last = d[np.arange(len(d)), k - 1]
    logs = np.where(np.isfinite(d), np.log(last[:, None] / np.where(np.isfinite(d), d, 1.0)), 0.0)
    return logs.sum(axis=1) / (k - 1)  # the k-th term is log 1 = 0


def intrinsic_dim(dist: np.ndarray) -> float:
    """Levina-Bickel MLE of the intrinsic dimension, pooled as 1 / mean(1 / m_i) (the mean summed
    exactly, so partitions give the same bits); NaN when no row qualifies."""
    inv = inverse_dims(dist)
    return float(1.0 / exact_mean(inv)) if len(inv) else float("nan")


def image_volumes(dist: np.ndarray, dim: float) -> np.ndarray:
    """Per row (r / median r)^dim, r = mean neighbour distance. A row without neighbours (a
    singleton cluster) or at distance 0 (a near-duplicate pair) gets the median's volume, 1."""
    r = mean_radius(dist)
    good = np.isfinite(r) & (r > 0)
    return volumes_from(r, float(np.median(r[good])) if good.any() else float("nan"), dim)


def mean_radius(dist: np.ndarray) -> np.ndarray:
    """r per row: its mean neighbour distance (NaN without neighbours)."""
    n = np.isfinite(dist).sum(axis=1)
    return np.where(n > 0, np.nansum(dist, axis=1) / np.maximum(n, 1), np.nan)


def volumes_from(r: np.ndarray, median: float, dim: float) -> np.ndarray:
    """(r / median)^dim, 1 where r is missing or 0, or nothing has a radius (median NaN)."""
    if not np.isfinite(median):
        return np.ones(len(r))
    good = np.isfinite(r) & (r > 0)
    rel = np.where(good, r / median, 1.0)
    return np.exp(np.clip(dim * np.log(rel), -700.0, 700.0))  # scale-free, no overflow at high dim


def volumes(emb: np.ndarray, cluster: np.ndarray, k: int, dim) -> tuple[np.ndarray, dict]:
    """(per-row volume, what summary.json records: k, dim and how it was set)."""
    dist = neighbour_distances(emb, cluster, int(k))
    if dim == "auto":
        d, rule = intrinsic_dim(dist), "Levina-Bickel MLE"
        if not np.isfinite(d):  # no cluster with 4+ members: nothing to measure, every image weighs 1
            d, rule = 0.0, "none: no cluster has 4 or more members"
    else:
        d, rule = float(dim), "fixed"
    v = image_volumes(dist, d)
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
    per, eff, fit = stratum_fit(ids, n, parts_total(sum_parts(v, inv, len(n)), len(n)), alpha, min_stratum)
    return (per ** fit["oversampling_beta"])[inv], eff, fit


def stratum_mass(ids: np.ndarray, n: np.ndarray, vsum: np.ndarray, mode: str, alpha: float,
                 min_stratum: int) -> tuple[np.ndarray, float, dict]:
    """From per-stratum statistics alone (what a partitioned run reduces): (mass per stratum,
    quota exponent, what to record). `vsum`: the exact sum of the volumes of each stratum."""
    n = np.asarray(n, np.int64)
    if mode == "count":
        return n.astype(np.float64), alpha, {}
    if mode == "volume":
        return np.asarray(vsum, np.float64), alpha, {}
    per, eff, fit = stratum_fit(ids, n, vsum, alpha, min_stratum)
    return n * per ** fit["oversampling_beta"], eff, fit


def stratum_fit(ids, n, vsum, alpha: float, min_stratum: int):
    """`auto`'s (volume per image of each stratum, exponent, record) from the stratum sums."""
    per = np.asarray(vsum, np.float64) / n
    line = oversampling_fit(n, per * n, min_stratum)
    beta = beta_of(line)
    eff = alpha + (1.0 - alpha) * beta if alpha <= 1 else alpha
    fit = {"oversampling_beta": beta, "alpha_effective": eff, "min_stratum": int(min_stratum),
           "fit_slope_intercept": None if line is None else list(line),  # the line report/scene_mass.png draws
           "strata": np.asarray(ids).tolist(), "stratum_images": np.asarray(n).tolist(),
           "stratum_volume_per_image": per.tolist()}
    return per, eff, fit
