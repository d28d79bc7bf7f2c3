"""Selection at scale on synthetic embeddings with scene structure: time and peak memory per N.

`python benchmarks/selection_scale.py [--sizes 10000,100000,1000000] [--dim 512]`

Each N runs in its own subprocess (peak RSS = that process's ru_maxrss) through the pure stage
functions the pipeline uses: scenes (assign_scenes) -> stratified clusters
(stratified_clusters) -> RS-Prune selection (methods.rsprune.select on a Pool), with the
configs of `+experiment=ratio85`. The data: S scenes with Zipf-like sizes, sub-clusters
inside each scene, 2% near-duplicates and 5% off-scene points (the "unmatched" stratum); a
labelled reference set of `--ref-per-class` points per scene drawn the same way.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from benchutil import table, write_section

CHUNK = 65536

ABS_THRESHOLD = 0.55  # the absolute cosine its recorded figures used (prune's default is now calibrated)


def synthetic(n: int, d: int, scenes: int, seed: int, offscene: float = 0.05, dup: float = 0.02,
              dtype=np.float32):
    """(n, d) unit rows (float32, or `dtype` as a store holds them) and their true scene (-1
    off-scene), built chunk by chunk so that generating never holds more than the output and
    one chunk. The same seed gives the same rows in either dtype, up to rounding."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((scenes, d)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    sub = rng.standard_normal((scenes, 64, d)).astype(np.float32)
    sub *= 0.5 / np.linalg.norm(sub, axis=2, keepdims=True)
    weight = 1.0 / np.arange(1, scenes + 1) ** 0.8  # a few scene types dominate, as in global data

    def draw(labels):
        x = centre[labels] + sub[labels, rng.integers(0, 64, len(labels))]
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(d))
        return x

    x = np.empty((n, d), dtype)
    truth = np.empty(n, np.int64)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        truth[s:s + m] = rng.choice(scenes, m, p=weight / weight.sum())
        c = draw(truth[s:s + m])
        off = rng.random(m) < offscene
        c[off] = rng.standard_normal((int(off.sum()), d), dtype=np.float32)
        truth[s:s + m][off] = -1
        x[s:s + m] = c / np.linalg.norm(c, axis=1, keepdims=True)
    ndup = int(dup * n)  # near-duplicates: copies of random rows with a little noise
    src, dst = rng.choice(n, ndup, replace=False), rng.choice(n, ndup, replace=False)
    c = x[src].astype(np.float32) + rng.standard_normal((ndup, d), dtype=np.float32) * np.float32(0.02 / np.sqrt(d))
    x[dst] = c / np.linalg.norm(c, axis=1, keepdims=True)
    truth[dst] = truth[src]
    return x, truth


def reference(d: int, scenes: int, per_class: int, seed: int):
    """A labelled reference benchmark from the same scene model: per_class points per scene."""
    ref, truth = synthetic(scenes * per_class * 8, d, scenes, seed, offscene=0.0, dup=0.0)
    keep = np.concatenate([np.flatnonzero(truth == c)[:per_class] for c in range(scenes)])
    return ref[keep], truth[keep]


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(n: int, d: int, scenes: int, per_class: int, seed: int) -> dict:
    """One N: generate, then time each stage; returns the row as a dict."""
    import pandas as pd

    from prune import methods
    from prune.cluster import stratified_clusters
    from prune.scenes import assign_scenes
    from rsprune.cli import compose

    cfg = compose("prune", ["+experiment=ratio85"])
    emb, _ = synthetic(n, d, scenes, seed)
    ref, labels = reference(d, scenes, per_class, seed)
    out = dict(n=n, data_gib=emb.nbytes / 2**30, rss_after_data_gib=rss_gib())
    t0 = time.perf_counter()
    scene, _ = assign_scenes(emb, ref, labels, str(cfg.scenes.assign), int(cfg.scenes.per_class),
                             int(cfg.scenes.knn), ABS_THRESHOLD, seed)
    t1 = time.perf_counter()
    cluster, dist, info = stratified_clusters(emb, scene, cfg.clustering, seed)
    t2 = time.perf_counter()
    ids = np.char.mod("%016x", np.random.default_rng(seed).permutation(n).astype(np.int64))
    sharp = np.random.default_rng(seed).normal(4.0, 0.5, n).astype(np.float32)  # stage 1's reading (selection.dull_z)
    pool = methods.Pool(pd.DataFrame({"id": ids.astype(object), "entropy_sharpness": sharp}), emb=emb, scene=scene,
                        cluster=cluster, dist=dist)
    budget = int(round((1 - float(cfg.ratio)) * n))
    method = methods.get("rsprune")
    t3 = time.perf_counter()
    chosen, notes = method.select(pool, budget, cfg, np.random.default_rng(seed))
    t4 = time.perf_counter()
    assert len(np.unique(chosen)) == budget, "selection missed its exact budget"
    count_cfg = compose("prune", ["+experiment=ratio85", "selection.mass=count"])  # the baseline: no volumes
    t5 = time.perf_counter()
    method.select(pool, budget, count_cfg, np.random.default_rng(seed))
    out["select_count_s"] = time.perf_counter() - t5
    out.update(strata=int(len(np.unique(scene))), unmatched=float((scene == -1).mean()), clusters=len(info),
               budget=budget, near_dup_notes=len(notes), scenes_s=t1 - t0, clusters_s=t2 - t1, select_s=t4 - t3,
               total_s=(t2 - t0) + (t4 - t3), peak_rss_gib=rss_gib())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--scenes", type=int, default=30, help="scene classes (AID has 30)")
    ap.add_argument("--ref-per-class", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.dim, args.scenes, args.ref_per_class, args.seed)))
        return
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--scenes", str(args.scenes),
               "--ref-per-class", str(args.ref_per_class), "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"N={n} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    for r in rows:
        r["select_vs_count"] = r["select_s"] / r["select_count_s"]
    cols = ["n", "strata", "clusters", "budget", "scenes_s", "clusters_s", "select_s", "select_count_s",
            "select_vs_count", "total_s", "data_gib",
            "rss_after_data_gib", "peak_rss_gib"]
    text = table(cols, [[r[c] for c in cols] for r in rows])
    ns = np.array([r["n"] for r in rows], float)
    exps = {}
    if len(rows) >= 2:
        for c in ("scenes_s", "clusters_s", "select_s", "total_s", "peak_rss_gib"):
            exps[c] = float(np.polyfit(np.log(ns), np.log([r[c] for r in rows]), 1)[0])
    grow = ", ".join(f"{k} {v:.2f}" for k, v in exps.items())
    print(text + f"\ngrowth exponents (slope of log cost on log N): {grow}")
    body = (f"Synthetic unit embeddings, d = {args.dim}, {args.scenes} scenes (Zipf-like sizes, 64 sub-clusters "
            f"each, 5% off-scene, 2% near-duplicates), reference {args.ref_per_class} per scene; configs of "
            f"`+experiment=ratio85` (budget 15%). Each N in its own process; `peak_rss_gib` is its ru_maxrss "
            f"(includes the float32 embeddings, `data_gib`). `total_s` = scenes + clusters + select (data "
            f"generation excluded). `select_s` is the default (`selection.mass=auto`: per-image volumes "
            f"from neighbours inside each cluster); `select_count_s` the same selection with "
            f"`selection.mass=count` in the same process (baseline; `select_vs_count` their ratio). "
            f"Target at N = 10^6 on 2 cores: <= 60 s, <= 4 GB.\n\n{text}\n\n"
            f"Growth exponents (least-squares slope of log cost on log N over the rows): {grow}.")
    write_section("selection_scale", "Selection at scale", body)


if __name__ == "__main__":
    main()
