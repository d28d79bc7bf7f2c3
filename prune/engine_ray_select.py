"""engine=ray, stage 5: RS-Prune's selection over the cluster buckets prune/engine_ray.py leaves.

Pass 1 per bucket: each cluster's neighbour distances (`volume.neighbour_distances`), its rows
in pool order as in one process; the bucket keeps r (mean neighbour distance) and reports the
Levina-Bickel sums exactly and its per-cluster sizes. The driver takes the dimension, the
median of r (`exact.median_of`: bit histograms), pass 2 sums each stratum's volumes exactly,
then the same waterfill gives integer quotas (`rsprune.quotas_from_counts`: exactly the budget)
and pass 3 picks inside every cluster (`selection.pick`). Outputs: out/<b>.npz per bucket
(pool position, id, cluster, stratum, centroid distance, selected, near-duplicate).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from prune.engine_ray import bucket, load, ray_map, save, save_json, unit
from prune.methods.rsprune import quotas_from_counts
from prune.selection import pick
from prune.volume import inverse_dims, mean_radius, neighbour_distances, stratum_mass, volumes_from
from rsprune.exact import bit_histogram, median_of, merge_parts, parts_total, sum_parts


def _keyed(parts: dict) -> list:
    return [[g, e, m] for (g, e), m in parts.items()]


def _unkeyed(rows) -> dict:
    return {(g, e): m for g, e, m in rows}


def _pass1(work, k, need_volume, b):
    d = bucket(work, "select", b)
    ids, sizes = np.unique(d["cluster"], return_counts=True)
    first = np.searchsorted(d["cluster"], ids)
    stats = {"cluster": ids.tolist(), "stratum": d["stratum"][first].tolist(), "size": sizes.tolist()}
    if need_volume:
        dist = neighbour_distances(unit(d["raw"]), d["cluster"], k)
        inv = inverse_dims(dist)
        r = mean_radius(dist)
        save(work / "radius" / f"{b}.npz", r=r)
        stats |= {"inv": _keyed(sum_parts(inv)), "inv_n": int(len(inv)),
                  "good": int((np.isfinite(r) & (r > 0)).sum())}
    save_json(work / "stats1" / f"{b}.json", stats)


def _good_r(work, b):
    r = load(work / "radius" / f"{b}.npz")["r"]
    return r[np.isfinite(r) & (r > 0)]


def _hist(work, level, prefix, b):
    save(work / f"hist{level}" / f"{b}.npz", h=bit_histogram(_good_r(work, b), level, prefix))


def _pass2(work, median, dim, strata, b):
    d = bucket(work, "select", b)  # the same sort as pass 1: r lines up
    v = volumes_from(load(work / "radius" / f"{b}.npz")["r"], median, dim)
    g = np.searchsorted(strata, d["stratum"])
    save_json(work / "stats2" / f"{b}.json", _keyed(sum_parts(v, g, len(strata))))


def _pass3(work, quotas_path, sel, b):
    q = load(quotas_path)
    quota = dict(zip(q["cluster"].tolist(), q["quota"].tolist()))
    d = bucket(work, "select", b)
    x = unit(d["raw"])
    chosen, dup = np.zeros(len(x), bool), np.zeros(len(x), bool)
    cuts = np.flatnonzero(np.diff(d["cluster"])) + 1
    rng = np.random.default_rng(0)  # unused: within=random is refused on engine=ray
    for rows in np.split(np.arange(len(x)), cuts):
        if not len(rows):
            continue
        got, skipped = pick(x[rows], d["dist"][rows], d["id"][rows], quota[int(d["cluster"][rows[0]])],
                            str(sel.within), float(sel.dedup), rng, float(sel.core))
        chosen[rows[got]], dup[rows[skipped]] = True, True
    save(work / "out" / f"{b}.npz", pos=d["pos"], id=d["id"], cluster=d["cluster"], stratum=d["stratum"],
         dist=d["dist"], selected=chosen, near_duplicate=dup)


def median_r(work: Path, n_buckets: int, n: int) -> float:
    """np.median of every bucket's positive radii, from four rounds of bit histograms."""
    def histogram(level, prefix):
        folder = work / f"hist{level}"
        tag = folder / "prefix.json"
        if not tag.exists() or json.loads(tag.read_text()) != prefix:  # a new prefix: count again
            for f in folder.glob("*.npz"):
                f.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            save_json(tag, prefix)
        ray_map(functools.partial(_hist, work, level, prefix), range(n_buckets), lambda b: folder / f"{b}.npz")
        return sum(load(folder / f"{b}.npz")["h"] for b in range(n_buckets))

    return median_of(histogram, n) if n else float("nan")


def select(cfg, budget: int, work: Path, n_buckets: int) -> dict:
    """Stage 5; returns what summary.json records of it (method_info) and the quota total."""
    sel = cfg.selection
    need_volume = str(sel.mass) != "count"
    ray_map(functools.partial(_pass1, work, int(sel.volume.k), need_volume), range(n_buckets),
            lambda b: work / "stats1" / f"{b}.json")
    stats = [json.loads((work / "stats1" / f"{b}.json").read_text()) for b in range(n_buckets)]
    cluster = np.array([c for s in stats for c in s["cluster"]], np.int64)
    cstratum = np.array([c for s in stats for c in s["stratum"]], np.int64)
    csize = np.array([c for s in stats for c in s["size"]], np.int64)
    strata = np.unique(cstratum)
    g = np.searchsorted(strata, cstratum)
    sizes = np.bincount(g, weights=csize, minlength=len(strata)).astype(np.int64)
    alpha, masses, extra = float(sel.alpha), sizes, {}
    if need_volume:
        inv_n = sum(s["inv_n"] for s in stats)
        if sel.volume.dim == "auto":
            inv = parts_total(merge_parts(*(_unkeyed(s["inv"]) for s in stats)), 1, [inv_n])[0] if inv_n else np.nan
            dim, rule = (float(1.0 / inv), "Levina-Bickel MLE") if inv_n else (0.0, "none: no cluster has 4 or more members")
        else:
            dim, rule = float(sel.volume.dim), "fixed"
        median = median_r(work, n_buckets, sum(s["good"] for s in stats))
        ray_map(functools.partial(_pass2, work, median, dim, strata), range(n_buckets),
                lambda b: work / "stats2" / f"{b}.json")
        vparts = merge_parts(*(_unkeyed(json.loads((work / "stats2" / f"{b}.json").read_text()))
                               for b in range(n_buckets)))
        vsum = parts_total(vparts, len(strata))
        masses, alpha, fit = stratum_mass(strata, sizes, vsum, str(sel.mass), alpha, int(sel.volume.min_stratum))
        extra = {"volume": {"mass": str(sel.mass), "k": int(sel.volume.k), "dim": dim, "dim_rule": rule,
                            "median_radius": median, **fit}}
    quotas = quotas_from_counts(sizes, masses, cluster, g, csize, budget, alpha)
    qpath = work / "quotas.npz"
    keys = np.array(sorted(quotas), np.int64)
    save(qpath, cluster=keys, quota=np.array([quotas[int(c)] for c in keys], np.int64))
    ray_map(functools.partial(_pass3, work, qpath, sel), range(n_buckets), lambda b: work / "out" / f"{b}.npz")
    return {"method_info": extra, "quota_total": int(sum(quotas.values())), "clusters": int(len(cluster))}
