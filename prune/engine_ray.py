"""engine=ray: stages 3-5 of prune/run.py as Ray Data operations over a partitioned corpus.

The engine only partitions and orchestrates; every number comes from the stage functions the
single-process path calls (prune/scenes.py, cluster.py, volume.py, methods/rsprune.py,
selection.py), on the same rows in the same order, so the kept set is the same bits:

- scenes: prototypes broadcast; nearest scene per partition (`knn.nearest`, batch-free); the
  threshold from the reference on the driver; pseudo-scenes fitted on a hash sample of the
  unmatched rows (`scenes.pseudo_sample`), assigned per partition.
- clusters: per stratum, k-means on the members `cluster.sample_mask` draws (a hash of the
  content, not a position), gathered into one task per stratum in pool order; assignment per
  partition; each `refine` step shuffles rows to buckets by cluster (files partitioned by
  centroid, as NeMo Curator's semantic dedup writes them: nemo_curator/stages/deduplication/
  semantic) and sums members in pool order (`cluster.member_sums`). DataComp's
  baselines/image_based_clustering.py has the same shape: fit on a sample, assign per shard.
- selection: per bucket, neighbour distances inside each cluster (`volume.neighbour_distances`);
  the driver reduces per-stratum and per-cluster statistics only (exact sums and a
  bit-histogram median, rsprune/exact.py: memory O(clusters)), computes the quotas
  (`rsprune.quotas_from_counts`, the same waterfill), then each bucket picks (`selection.pick`).

Every task writes its output file atomically and is skipped when the file is there, so a run
whose worker died is rerun to the same files. Partitions come from a `source` with `n_parts`
and `load(p) -> {pos, hrank, key, id, raw}`: every usable row of partition p in content-hash
order (`hrank`), `pos` its pool position (-1: dropped by stage 1), `key` its uint64 content key,
`raw` its stored embedding. prune/engine_ray_run.py wires this into prune/run.py; this file
imports ray only inside functions (a plain install never needs it).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from prune.cluster import n_clusters, sample_mask, sample_size, unit_means
from prune.embed import unit_rows
from prune.scenes import UNMATCHED, fit_pseudo, n_pseudo, pseudo_sample
from rsprune.knn import kmeans, nearest


def save(path: Path, **arrays) -> None:
    """npz written under a temporary name, then renamed: a file there is a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def mark(path: Path) -> None:
    """An empty marker: a partition's files are all written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def unit(raw: np.ndarray) -> np.ndarray:
    """The float32 unit rows the single-process store gives for the same stored rows."""
    x = np.array(raw, np.float32)
    return x if raw.dtype == np.float32 else unit_rows(x)


class _Task:
    """One Ray Data batch = one item: run `fn(item)` unless its output file exists."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def __call__(self, batch):
        import resource

        for item in batch["item"]:
            if not self.out(int(item)).exists():
                self.fn(int(item))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this worker's peak so far
        return {"item": batch["item"], "pid": np.full(len(batch["item"]), os.getpid()),
                "peak_rss": np.full(len(batch["item"]), rss)}


WORKER_PEAK: dict[int, int] = {}  # worker pid -> peak RSS in bytes, over this driver's maps


def ray_map(fn, items, out) -> None:
    """fn(item) for each item whose output `out(item)` is missing, as a Ray Data map (one CPU,
    one item per task)."""
    import ray.data

    todo = [int(i) for i in items if not out(int(i)).exists()]
    if todo:
        rows = ray.data.from_items(todo).map_batches(_Task(fn, out), batch_size=1, num_cpus=1).take_all()
        for r in rows:
            WORKER_PEAK[int(r["pid"])] = max(WORKER_PEAK.get(int(r["pid"]), 0), int(r["peak_rss"]))


# ---- stage 3: scenes ----

def _scene_part(src, protos, owner, threshold, work, p):
    d = src.load(p)
    score, idx = nearest(protos, unit(d["raw"]))
    save(work / "scene" / f"{p}.npz", best=owner[idx].astype(np.int64), score=score.astype(np.float32),
         unmatched=score < threshold)


def _pseudo_part(src, work, n_u, seed, p):
    d, s = src.load(p), load(work / "scene" / f"{p}.npz")
    rows = np.flatnonzero(s["unmatched"])
    take = rows[pseudo_sample(d["key"][rows], n_u, seed)]
    save(work / "pseudo" / f"{p}.npz", hrank=d["hrank"][take], raw=d["raw"][take])


def _fit_pseudo(work, n_parts, k, seed, _):
    parts = [load(work / "pseudo" / f"{p}.npz") for p in range(n_parts)]
    hrank = np.concatenate([q["hrank"] for q in parts])
    x = unit(np.concatenate([q["raw"] for q in parts]))[np.argsort(hrank, kind="stable")]
    np.save(work / "pseudo_centroids.tmp.npy", fit_pseudo(x, k, seed))
    os.replace(work / "pseudo_centroids.tmp.npy", work / "pseudo_centroids.npy")


def _strata_part(src, work, n_classes, k, p):
    d, s = src.load(p), load(work / "scene" / f"{p}.npz")
    strata = s["best"].copy()
    rows = np.flatnonzero(s["unmatched"])
    if k == 0:
        strata[rows] = UNMATCHED
    elif k == 1:
        strata[rows] = n_classes
    else:
        cent = np.load(work / "pseudo_centroids.npy")
        strata[rows] = n_classes + nearest(cent, unit(d["raw"][rows]))[1]
    pool = d["pos"] >= 0
    ids, n = np.unique(strata[pool], return_counts=True)
    save(work / "strata" / f"{p}.npz", stratum=strata, ids=ids, n=n)


def scenes(src, protos, owner, threshold: float, n_classes: int, pseudo_size, seed: int, work: Path) -> dict:
    """Stratum per usable row (files strata/<p>.npz); returns {stratum: pool count} and k."""
    P = src.n_parts
    ray_map(functools.partial(_scene_part, src, protos, owner, threshold, work), range(P),
            lambda p: work / "scene" / f"{p}.npz")
    n_all = n_u = 0
    for p in range(P):
        u = load(work / "scene" / f"{p}.npz")["unmatched"]
        n_all, n_u = n_all + len(u), n_u + int(u.sum())
    k = n_pseudo(n_u, n_all, n_classes, pseudo_size)
    if k >= 2:
        ray_map(functools.partial(_pseudo_part, src, work, n_u, seed), range(P), lambda p: work / "pseudo" / f"{p}.npz")
        ray_map(functools.partial(_fit_pseudo, work, P, k, seed), [0], lambda _: work / "pseudo_centroids.npy")
    ray_map(functools.partial(_strata_part, src, work, n_classes, k), range(P), lambda p: work / "strata" / f"{p}.npz")
    counts: dict[int, int] = {}
    for p in range(P):
        z = load(work / "strata" / f"{p}.npz")
        for s, c in zip(z["ids"].tolist(), z["n"].tolist()):
            counts[s] = counts.get(s, 0) + c
    return {"counts": counts, "k_pseudo": k, "unmatched": n_u, "usable": n_all}


# ---- stage 4: clusters ----

def plan_strata(counts: dict, cfg, seed: int) -> dict:
    """Per stratum (sorted, as stratified_clusters walks them): n, k, sample size, seed, offset."""
    out, offset = {}, 0
    for s in sorted(counts):
        n = counts[s]
        k = n_clusters(n, cfg.k_rule, cfg.cluster_size, cfg.sqrt_scale, cfg.max_k)
        out[s] = dict(n=n, k=k, m=sample_size(n, k, cfg.sample_fraction, cfg.min_sample), seed=seed + int(s) + 1,
                      offset=offset)
        offset += k
    return out


def _pool_rows(src, work, p):
    """(pool rows of partition p: their data, stratum)."""
    d, st = src.load(p), load(work / "strata" / f"{p}.npz")["stratum"]
    rows = np.flatnonzero(d["pos"] >= 0)
    return {k: v[rows] for k, v in d.items()}, st[rows]


def _sample_part(src, work, plan, p):
    d, st = _pool_rows(src, work, p)
    for s in np.unique(st):
        info, rows = plan[int(s)], np.flatnonzero(st == s)
        take = rows[sample_mask(d["key"][rows], info["m"], info["n"], info["seed"])]
        save(work / "sample" / str(int(s)) / f"{p}.npz", pos=d["pos"][take], raw=d["raw"][take])
    mark(work / "sample" / f"{p}.done")


def _fit_stratum(work, plan, niter, s):
    folder = work / "sample" / str(s)
    parts = [load(f) for f in sorted(folder.glob("*.npz"))]
    pos = np.concatenate([q["pos"] for q in parts])
    x = unit(np.concatenate([q["raw"] for q in parts]))[np.argsort(pos)]  # the stratum's pool order
    cent, _ = kmeans(x, plan[s]["k"], seed=plan[s]["seed"], niter=niter, spherical=True)
    save(work / "cent0" / f"{s}.npz", c=cent)


def refines(info: dict, refine: int) -> int:
    return refine if info["m"] < info["n"] else 0  # a fit on every member has nothing left to refine


def _assign_part(src, work, plan, step, last, n_buckets, p):
    """Assign partition p's pool rows with the step's centroids; bucket the rows by cluster for
    the next refine step or (the last step) for the selection."""
    d, st = _pool_rows(src, work, p)
    cluster, dist = np.full(len(st), -1, np.int64), np.zeros(len(st), np.float32)
    x = unit(d["raw"])
    for s in np.unique(st):
        info, rows = plan[int(s)], np.flatnonzero(st == s)
        done = min(step, refines(info, last))
        sim, lab = nearest(load(work / f"cent{done}" / f"{int(s)}.npz")["c"], x[rows])
        cluster[rows], dist[rows] = lab + info["offset"], (1.0 - sim).astype(np.float32)
    moving = np.ones(len(st), bool) if step == last else np.array([refines(plan[int(s)], last) > step for s in st], bool)
    name = "select" if step == last else f"refine{step}"
    for b in range(n_buckets):
        r = np.flatnonzero(moving & (cluster % n_buckets == b))
        save(work / name / str(b) / f"{p}.npz", pos=d["pos"][r], id=d["id"][r], cluster=cluster[r],
             stratum=st[r], dist=dist[r], raw=d["raw"][r])
    mark(work / name / f"{p}.done")


def bucket(work: Path, name: str, b: int) -> dict:
    """Bucket b's rows from every partition, sorted by (cluster, pool position)."""
    parts = [load(f) for f in sorted((work / name / str(b)).glob("*.npz"))]
    d = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
    order = np.lexsort((d["pos"], d["cluster"]))
    return {k: v[order] for k, v in d.items()}


def _sums_bucket(work, step, b):
    from prune.cluster import member_sums

    d = bucket(work, f"refine{step}", b)
    ids, lab = np.unique(d["cluster"], return_inverse=True)
    save(work / f"sums{step}" / f"{b}.npz", cluster=ids, sums=member_sums(unit(d["raw"]), lab, len(ids)))


def _update(work, plan, step, n_buckets, s):
    """Stratum s's centroids after refine step `step`: unit member means (empty: unchanged)."""
    info, old = plan[s], load(work / f"cent{step}" / f"{s}.npz")["c"]
    sums = np.zeros_like(old)
    for b in range(n_buckets):
        z = load(work / f"sums{step}" / f"{b}.npz")
        m = (z["cluster"] >= info["offset"]) & (z["cluster"] < info["offset"] + info["k"])
        sums[z["cluster"][m] - info["offset"]] = z["sums"][m]
    save(work / f"cent{step + 1}" / f"{s}.npz", c=unit_means(sums, old))


def clusters(src, plan: dict, cfg, work: Path, n_buckets: int) -> None:
    """Stage 4; leaves the pool rows bucketed by final cluster in select/<b>/<p>.npz."""
    P, strata, R = src.n_parts, sorted(plan), int(cfg.refine)
    ray_map(functools.partial(_sample_part, src, work, plan), range(P), lambda p: work / "sample" / f"{p}.done")
    ray_map(functools.partial(_fit_stratum, work, plan, int(cfg.niter)), strata, lambda s: work / "cent0" / f"{s}.npz")
    last = R if any(refines(plan[s], R) for s in strata) else 0
    for step in range(last + 1):
        name = "select" if step == last else f"refine{step}"
        ray_map(functools.partial(_assign_part, src, work, plan, step, last, n_buckets), range(P),
                lambda p: work / name / f"{p}.done")
        if step == last:
            break
        ray_map(functools.partial(_sums_bucket, work, step), range(n_buckets), lambda b: work / f"sums{step}" / f"{b}.npz")
        moved = [s for s in strata if refines(plan[s], R) > step]
        ray_map(functools.partial(_update, work, plan, step, n_buckets), moved,
                lambda s: work / f"cent{step + 1}" / f"{s}.npz")
        for s in strata:  # strata that stop refining keep their centroids for the next step
            src_c, dst = work / f"cent{step}" / f"{s}.npz", work / f"cent{step + 1}" / f"{s}.npz"
            if s not in moved and not dst.exists():
                save(dst, c=load(src_c)["c"])
