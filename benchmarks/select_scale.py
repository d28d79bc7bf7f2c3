"""The single-process selection at 10^6 and 10^7 rows, this checkout against an older one.

`python benchmarks/select_scale.py --before DIR [--before-max N] [--sizes 1e5,1e6,1e7] [--timeout 600]`

DIR holds the older code (`git archive <commit> | tar -x -C DIR`). Each (code, N) runs in its
own process on the same synthetic rows (benchmarks/selection_scale.py's scene model, 256-d,
float16 as the embedding store holds them; the older code gets them widened to float32, as
its pipeline did) through what prune/run.py runs after the
embedding: the cache keys of the scenes and clusters tables, scenes (assign_scenes),
stratified clusters, the RS-Prune selection (`+experiment=ratio85`), the manifest (reasons() and
build_manifest() over an index table of ids and content hashes) and the summary's counts. The
older code runs only up to `--before-max` rows (default: every size).
A process past `--timeout` seconds after its data is generated is killed and reported as not finishing, with its peak
memory so far. The kept sets of the two codes are compared where both finish: equal where no
stratum reaches the older code's cap of 4096 clusters (10^5 here), different past it, where
this code splits the stratum instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchutil import ROOT, table, write_section

HERE = Path(__file__).resolve().parent
THRESHOLD = 0.55  # an absolute scene cosine, as selection_scale's figures (no reference calibration here)


def vm_hwm_gib(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(n: int, d: int, seed: int, overrides: list[str], kept_out: str) -> dict:
    import pandas as pd

    from prune import methods, outputs
    from prune.cluster import stratified_clusters
    from prune.scenes import assign_scenes
    from rsprune import cache
    from rsprune.cli import compose
    from selection_scale import reference, synthetic

    cfg = compose("prune", ["+experiment=ratio85", *overrides])
    emb, _ = synthetic(n, d, 30, seed, dtype=np.float16)
    if not hasattr(cache, "rows_digest"):  # the older code: float32 rows, as its store's gather handed them over
        emb = emb.astype(np.float32)
    ref, labels = reference(d, 30, 300, seed)
    # the index table's columns the selection and the manifest read, ids and content hashes, as
    # the pipeline holds them (pandas text columns), built a chunk of Python strings at a time
    text = lambda fmt, v: pd.concat([pd.Series([fmt % x for x in v[s:s + (1 << 20)].tolist()], dtype=str)
                                     for s in range(0, n, 1 << 20)], ignore_index=True)
    idx = pd.DataFrame({"id": text("%016x", np.random.default_rng(seed).permutation(n)),
                        "content_hash": text("%040x", np.arange(n)), "readable": np.ones(n, bool),
                        "duplicate_of": pd.Series("", index=range(n), dtype=str),
                        "entropy_sharpness": np.random.default_rng(seed).normal(4.0, 0.5, n).astype(np.float32)})
    out, t = dict(n=n, data_gib=emb.nbytes / 2**30, rss_data_gib=vm_hwm_gib()), {}
    Path(kept_out + ".ready").touch()  # the launcher's clock starts here

    t0 = time.perf_counter()
    scene, similarity = assign_scenes(emb, ref, labels, "prototype", 1, 10, THRESHOLD, seed)
    t["scenes"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # the two per-row cache keys, as each code builds them
    if hasattr(cache, "rows_digest"):  # the table's column, as prune/run.py hands it over
        cache.stable_hash("scenes", cache.rows_digest(idx.content_hash))
        cache.stable_hash("clusters", cache.rows_digest(scene, idx.content_hash))
    else:  # the older code: a list of every hash
        hashes = idx.content_hash.tolist()
        cache.stable_hash("scenes", hashes)
        cache.stable_hash("clusters", scene.tolist(), hashes)
    t["keys"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cluster, dist, info = stratified_clusters(emb, scene, cfg.clustering, seed)
    t["clusters"] = time.perf_counter() - t0
    pool = methods.Pool(idx, emb=emb, scene=scene, cluster=cluster, dist=dist)
    budget = int(round((1 - float(cfg.ratio)) * n))
    t0 = time.perf_counter()
    chosen, notes = methods.get("rsprune").select(pool, budget, cfg, np.random.default_rng(seed))
    t["select"] = time.perf_counter() - t0
    assert len(np.unique(chosen)) == budget, "selection missed its exact budget"

    t0 = time.perf_counter()  # the manifest, by the pipeline's own functions, and its counts
    sel, usable = np.zeros(n, bool), np.ones(n, bool)
    sel[chosen] = True
    reason = outputs.reasons(idx, usable, usable, True, notes, np.arange(n), sel, np.zeros(0, np.int64))
    m = outputs.build_manifest(idx, usable, outputs.Columns(scene, similarity, cluster, dist), sel, reason,
                               [f"s{i}" for i in range(30)], {})
    if hasattr(outputs, "tally"):
        counts = outputs.tally(m, usable)
        per = (counts["per_scene"], counts["per_cluster"])
    else:
        s = outputs.build_summary(cfg, m, "k", usable, 0.0, n, budget, 0, {}, {}, {}, {})
        per = (s["per_scene"], s["per_cluster"])
    t["summary"] = time.perf_counter() - t0
    assert sum(v["selected"] for v in per[0].values()) == budget
    np.save(kept_out, np.sort(pool.ids[chosen].astype("U16")))
    out.update({f"{k}_s": v for k, v in t.items()}, total_s=sum(t.values()), clusters=len(info),
               mean_cluster=n / max(len(info), 1), peak_rss_gib=vm_hwm_gib())
    return out


def launch(code: Path, n: int, args, overrides: list[str], kept: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{code}{os.pathsep}{HERE}")
    cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--seed", str(args.seed),
           "--kept", str(kept), *[f"--override={o}" for o in overrides]]
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, peak, ready = time.time(), 0.0, Path(str(kept) + ".ready")
    ready.unlink(missing_ok=True)
    while proc.poll() is None and (not ready.exists() or time.time() - start < args.timeout):
        if not ready.exists():
            start = time.time()
        try:
            peak = max(peak, vm_hwm_gib(proc.pid))
        except OSError:
            pass
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        return dict(n=n, finished=False, total_s=float("nan"), peak_rss_gib=peak,
                    note=f"did not finish in {args.timeout:.0f} s (killed)")
    stdout, stderr = proc.communicate()
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{code} N={n} failed:\n{stderr[-3000:]}")
    return dict(json.loads(line[0][7:]), finished=True, note="")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=False, help="folder holding the older code")
    ap.add_argument("--before-name", default="before")
    ap.add_argument("--before-max", type=float, default=float("inf"), help="largest N the older code runs")
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", default="/tmp/select_scale")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--kept", help=argparse.SUPPRESS)
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.dim, args.seed, args.override, args.kept)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [("this checkout", ROOT, [])]
    if args.before:
        runs += [(args.before_name, Path(args.before).resolve(), [])]
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        for name, code, over in runs:
            if name == args.before_name and code != ROOT and n > args.before_max:
                continue
            kept = work / f"{len(rows)}.npy"
            r = launch(code, n, args, over, kept)
            r.update(code=name, kept=str(kept))
            rows.append(r)
            print({k: v for k, v in r.items() if k != "kept"}, flush=True)
    for r in rows:
        twin = [o for o in rows if o["n"] == r["n"] and o["code"] == args.before_name and o["finished"]]
        r["same_kept"] = ("-" if not (twin and r["finished"]) or r["code"] == args.before_name else
                          str(np.array_equal(np.load(r["kept"]), np.load(twin[0]["kept"]))))
        base = twin[0]["total_s"] if twin else float("nan")
        r["x_before"] = base / r["total_s"] if r["finished"] and twin else float("nan")
    cols = ["n", "code", "clusters", "mean_cluster", "scenes_s", "keys_s", "clusters_s", "select_s", "summary_s",
            "total_s", "x_before", "data_gib", "rss_data_gib", "peak_rss_gib", "same_kept", "note"]
    text = table(cols, [[r.get(c, "-") for c in cols] for r in rows])
    print(text)
    body = (f"Synthetic unit rows, d = {args.dim}, float16 (the store's dtype), 30 scenes (Zipf-like sizes, 64 "
            f"sub-clusters each, 5% off-scene, 2% near-duplicates), scene cosine {THRESHOLD}; configs of "
            f"`+experiment=ratio85` (budget 15%); the manifest is built by the pipeline's reasons() and build_manifest() over an index table of ids and content hashes (pandas text columns, as the pipeline's index table holds them). The older code gets the rows widened to float32, as its "
            f"pipeline fed its stages; this one widens one chunk or cluster at a time. Each row is its own process; `total_s` = scenes + the two "
            f"per-row cache keys + clusters + select + the manifest and the summary's counts (data generation "
            f"excluded); `peak_rss_gib` is the process's VmHWM (it includes the rows, `data_gib`), `rss_data_gib` the "
            f"VmHWM once the rows and the index table are built. `{args.before_name}`: "
            f"the code before this change, on the same rows. `x_before` = its total / this one's. `same_kept`: "
            f"kept ids equal to `{args.before_name}`'s at that N (different where a stratum needs more than the older "
            f"cap of 4096 clusters: the older code capped it, this one splits it into cells). Target at 10^7 on 2 cores: <= 600 s, "
            f"<= 8 GiB."
            + (f" `{args.before_name}` ran only up to N = {args.before_max:.0e} (`--before-max`)." if args.before and
               args.before_max < max(r["n"] for r in rows) else "") + f"\n\n{text}")
    write_section("select_scale", "Single-process selection at 10^6 and 10^7 rows", body)


if __name__ == "__main__":
    main()
