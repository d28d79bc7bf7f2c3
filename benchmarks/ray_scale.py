"""engine=ray at scale on synthetic rows: scenes -> clusters -> selection -> manifest + kept.txt.

`python benchmarks/ray_scale.py [--sizes 1000000] [--compare 1000000] [--dim 256]`

Each N runs in its own subprocess: synthetic float16 unit rows (30 scene types of Zipf-like
sizes, 64 sub-clusters each, 2% near-duplicates, 5% off-scene) are written as a partitioned
store (one .npy per 10^5 rows), then prune/engine_ray.py runs on a local Ray cluster of two
single-CPU workers (ray.init(num_cpus=2)) with the `+experiment=ratio85` config; the manifest
is written per cluster bucket and kept.txt by a streaming merge. Reported: wall time, the peak
RSS of every Ray worker and of the driver, the exact budget, and (sizes in --compare) the
single-process path on the same rows in the same process (the pure stage functions on the
whole array, as prune/run.py calls them): its time, the throughput ratio and whether the kept
sets are identical. Then a rerun after a worker was killed mid-run (--kill) must give
byte-identical outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchutil import table, write_section  # noqa: E402

PART = 100_000
SCENES = 30


def model(d: int, seed: int):
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((SCENES, d)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    sub = rng.standard_normal((SCENES, 64, d)).astype(np.float32)
    sub *= 0.5 / np.linalg.norm(sub, axis=2, keepdims=True)
    w = 1.0 / np.arange(1, SCENES + 1) ** 0.8
    return centre, sub, w / w.sum()


def draw(n: int, d: int, centre, sub, p, rng, offscene=0.05, dup=0.02):
    lab = rng.choice(SCENES, n, p=p)
    x = centre[lab] + sub[lab, rng.integers(0, 64, n)]
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(d))
    off = rng.random(n) < offscene
    x[off] = rng.standard_normal((int(off.sum()), d), dtype=np.float32)
    nd = int(dup * n)
    src, dst = rng.choice(n, nd, replace=False), rng.choice(n, nd, replace=False)
    x[dst] = x[src] + rng.standard_normal((nd, d), dtype=np.float32) * np.float32(0.02 / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, lab


def write_store(folder: Path, n: int, d: int, seed: int) -> int:
    """float16 rows, one file per partition, each drawn from its own seed: memory O(partition)."""
    centre, sub, p = model(d, seed)
    parts = -(-n // PART)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(parts):
        m = min(PART, n - i * PART)
        x, _ = draw(m, d, centre, sub, p, np.random.default_rng([seed, i]))
        np.save(folder / f"{i}.npy", x.astype(np.float16))
    return parts


def reference(d: int, seed: int, per_class: int = 20):
    centre, sub, p = model(d, seed)
    x, lab = draw(SCENES * per_class * 4, d, centre, sub, np.full(SCENES, 1 / SCENES), np.random.default_rng(seed + 1),
                  offscene=0.0, dup=0.0)
    keep = np.concatenate([np.flatnonzero(lab == c)[:per_class] for c in range(SCENES)])
    return x[keep], lab[keep]


class SynthSource:
    """Partition p: rows p*PART.. of the synthetic store; all in the pool, id = row number."""

    def __init__(self, folder: Path, n_parts: int):
        self.folder, self.n_parts = folder, n_parts

    def load(self, p: int) -> dict:
        from rsprune.exact import mix64

        raw = np.load(self.folder / f"{p}.npy")
        ids = np.arange(p * PART, p * PART + len(raw), dtype=np.int64)
        return {"pos": ids, "hrank": ids, "key": mix64(ids.astype(np.uint64), 0), "id": ids, "raw": raw}


def scene_inputs(cfg, d: int, seed: int):
    from prune.scenes import calibrate, heldout_scores, prototypes

    ref, lab = reference(d, seed)
    protos, owner = prototypes(ref, lab, 1, int(cfg.seed))
    held = heldout_scores(ref, lab, "prototype", 1, 10, int(cfg.seed))
    threshold, _ = calibrate(cfg.scenes.threshold, float(cfg.scenes.quantile), np.zeros(0), lambda: held)
    return ref, lab, protos, owner, threshold


def ray_path(cfg, folder: Path, n_parts: int, n: int, work: Path, d: int, seed: int) -> dict:
    from prune import engine_ray, engine_ray_select
    from prune.budget import budget as budget_of

    t = time.perf_counter()
    src = SynthSource(folder, n_parts)
    _, _, protos, owner, threshold = scene_inputs(cfg, d, seed)
    sc = engine_ray.scenes(src, protos, owner, threshold, SCENES, cfg.scenes.pseudo_size, int(cfg.seed), work)
    plan = engine_ray.plan_strata(sc["counts"], cfg.clustering, int(cfg.seed))
    n_buckets = max(1, -(-n // PART))
    engine_ray.clusters(src, plan, cfg.clustering, work, n_buckets)
    budget = budget_of(n, float(cfg.ratio))
    out = engine_ray_select.select(cfg, budget, work, n_buckets)
    kept = write_outputs(work, n_buckets)
    return {"wall_s": time.perf_counter() - t, "budget": budget, "kept": kept, "clusters": out["clusters"],
            "k_pseudo": sc["k_pseudo"]}


def write_outputs(work: Path, n_buckets: int) -> int:
    """manifest/<b>.parquet per bucket, kept.txt by a k-way merge of the buckets' sorted ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prune.engine_ray import load

    (work / "manifest").mkdir(exist_ok=True)
    kept_parts = []
    for b in range(n_buckets):
        z = load(work / "out" / f"{b}.npz")
        pq.write_table(pa.table({k: z[k] for k in ("id", "stratum", "cluster", "dist", "selected", "near_duplicate")}),
                       work / "manifest" / f"{b}.parquet")
        np.save(work / "manifest" / f"kept-{b}.npy", np.sort(z["id"][z["selected"]]))
        kept_parts.append(work / "manifest" / f"kept-{b}.npy")
    n = 0
    with open(work / "kept.txt", "w") as f:
        streams = [iter(np.load(p, mmap_mode="r")) for p in kept_parts]
        for i in heapq.merge(*streams):
            f.write(f"tile_{int(i):09d}\n")
            n += 1
    return n


def local_path(cfg, folder: Path, n_parts: int, d: int, seed: int):
    """The single-process path on the same rows: the pure stages on the whole array."""
    from threadpoolctl import threadpool_limits

    import pandas as pd

    from prune import methods
    from prune.budget import budget as budget_of
    from prune.cluster import stratified_clusters
    from prune.methods.rsprune import select
    from prune.scenes import assign_scenes, stratify
    from rsprune.exact import mix64

    with threadpool_limits(1):
        t = time.perf_counter()
        emb = np.concatenate([SynthSource(folder, n_parts).load(p)["raw"] for p in range(n_parts)])
        from prune.engine_ray import unit
        emb = unit(emb)
        ids = np.arange(len(emb), dtype=np.int64)
        keys = mix64(ids.astype(np.uint64), 0)
        ref, lab, _, _, threshold = scene_inputs(cfg, d, seed)
        best, score = assign_scenes(emb, ref, lab, "prototype", 1, 10, -np.inf, int(cfg.seed))
        strata, _ = stratify(best, score, lambda r: emb[r], SCENES, threshold, cfg.scenes.pseudo_size, int(cfg.seed),
                             keys)
        cluster, dist, _ = stratified_clusters(emb, strata, cfg.clustering, int(cfg.seed), keys=keys)
        pool = methods.Pool(pd.DataFrame({"id": ids}), emb=emb, scene=strata, cluster=cluster, dist=dist)
        chosen, _ = select(pool, budget_of(len(emb), float(cfg.ratio)), cfg, np.random.default_rng(int(cfg.seed)))
        return time.perf_counter() - t, "".join(f"tile_{int(i):09d}\n" for i in np.sort(ids[chosen]))


def child(n: int, d: int, seed: int, compare: bool, root: Path, kill: bool) -> dict:
    from omegaconf import OmegaConf

    from prune import engine_ray
    from prune.engine_ray_run import start_ray
    from rsprune.cli import compose

    cfg = compose("prune", ["+experiment=ratio85", "report.enabled=false"])
    folder = root / "store"
    t = time.perf_counter()
    n_parts = write_store(folder, n, d, seed)
    gen_s = time.perf_counter() - t
    start_ray(OmegaConf.create({"address": None, "num_cpus": 2, "object_store_gb": 0.5}))
    row = {"n": n, "dim": d, "generate_s": round(gen_s, 1)}
    r = ray_path(cfg, folder, n_parts, n, root / "work", d, seed)
    row |= {"ray_wall_s": round(r["wall_s"], 1), "budget": r["budget"], "kept": r["kept"], "clusters": r["clusters"],
            "worker_peak_gib": sorted(round(v / 2**30, 3) for v in engine_ray.WORKER_PEAK.values())}
    row["driver_peak_ray_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # before the local run
    digest = hashlib.sha256((root / "work" / "kept.txt").read_bytes()).hexdigest()
    if kill:
        row["rerun_after_kill_identical"] = rerun_after_kill(cfg, folder, n_parts, n, root, d, seed, digest)
    if compare:
        local_s, kept = local_path(cfg, folder, n_parts, d, seed)
        row |= {"local_s": round(local_s, 1), "ratio_local_over_ray": round(local_s / r["wall_s"], 2),
                "identical_kept": kept == (root / "work" / "kept.txt").read_text()}
    row["driver_peak_all_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def rerun_after_kill(cfg, folder, n_parts, n, root, d, seed, digest) -> bool:
    """A second work folder: a map is stopped by killing one of its workers (SIGKILL, by the pid
    the task reports), then the run is started again over the same folder."""
    from prune import engine_ray

    work = root / "work2"
    victim = {}
    killer = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, time, pathlib
w = pathlib.Path({str(work)!r}) / "strata"
while not (w.exists() and any(w.glob('*.npz'))):
    time.sleep(0.2)
pids = [int(p) for p in {sorted(engine_ray.WORKER_PEAK)!r}]
for p in pids[:1]:
    try:
        os.kill(p, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""])
    try:
        ray_path(cfg, folder, n_parts, n, work, d, seed)
    except Exception as e:  # the killed task's map fails (or Ray retried it): run again
        victim["error"] = type(e).__name__
    killer.wait()
    ray_path(cfg, folder, n_parts, n, work, d, seed)
    return hashlib.sha256((work / "kept.txt").read_bytes()).hexdigest() == digest and all(
        (work / "manifest" / f.name).read_bytes() == f.read_bytes() for f in (root / "work" / "manifest").glob("*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--compare", default="1000000", help="sizes that also run the single-process path")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill", action="store_true", help="also rerun after killing a worker mid-run")
    ap.add_argument("--child", type=int)
    ap.add_argument("--root")
    a = ap.parse_args()
    compare = {int(s) for s in a.compare.split(",") if s}
    if a.child:
        print(json.dumps(child(a.child, a.dim, a.seed, a.child in compare, Path(a.root), a.kill)), flush=True)
        return
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        root = Path(tempfile.mkdtemp(prefix=f"ray_scale_{n}_"))
        try:
            cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(a.dim), "--seed", str(a.seed),
                   "--compare", a.compare, "--root", str(root)] + (["--kill"] if a.kill else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
            if out.returncode:
                sys.exit(f"error: N={n} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    cols = ["n", "generate_s", "ray_wall_s", "local_s", "ratio_local_over_ray", "budget", "kept", "clusters",
            "identical_kept", "rerun_after_kill_identical", "worker_peak_gib", "driver_peak_ray_gib",
            "driver_peak_all_gib"]
    text = table(cols, [[r.get(c, "-") for c in cols] for r in rows])
    body = (f"Synthetic float16 unit rows, d = {a.dim}, {SCENES} scene types (Zipf-like sizes, 64 sub-clusters each, "
            "5% off-scene, 2% near-duplicates), stored one .npy per 10^5 rows; configs of `+experiment=ratio85`. "
            "engine=ray (prune/engine_ray.py) on a local cluster of two single-CPU workers: scenes -> clusters -> "
            "selection -> manifest (one parquet per cluster bucket) and kept.txt (streamed merge). `local_s`: the "
            "single-process stage functions on the same rows, in the same process, one BLAS thread; "
            "`ratio_local_over_ray` > 1 means Ray is faster. Worker peaks: each Ray worker's ru_maxrss; driver: "
            "the benchmark process's after the Ray run (`driver_peak_ray_gib`: it generated the store first, one "
            "partition at a time) and at the end (`_all`: with the single-process run, which holds every row). Data generation is "
            f"excluded from both times.\n\n{text}")
    write_section("ray_scale", "engine=ray at scale (synthetic)", body)


if __name__ == "__main__":
    main()
