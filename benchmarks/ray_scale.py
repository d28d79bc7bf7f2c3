"""engine=ray against one process on the same synthetic rows: scenes -> clusters -> selection.

`python benchmarks/ray_scale.py [--sizes 2e5,1e6] [--workers 2] [--kill 2e5] [--work /tmp/ray_scale]`

Per N, one process writes the rows into a real embedding store (rsprune/embed_store.py's shard
files, float16, 2048 rows a shard: what both engines read), then each run is its own process:
`local` (one process, one BLAS/faiss thread, as a Ray task runs) and `ray` (a local Ray cluster
of `--workers` CPUs: single-CPU tasks). Both run what prune/run.py runs after the embedding,
through its own functions: `features` (scene_stage, cluster_stage) and `select`
(`+experiment=ratio85`). The rows: benchmarks/selection_scale.py's scene model (256-d unit rows,
30 Zipf-sized scenes of 64 sub-clusters, 5% off-scene, 2% near-duplicates) and its labelled
reference (300 a scene), in the same store. With `--kill N`, a third run at that N SIGKILLs a
Ray worker running a task `--kill-after` s after the first cluster task's file, runs again in the same cache when the first
run fails, and its outputs are compared with the uninterrupted run's; a fourth SIGKILLs the
driver (and the cluster it started) at the same point and runs again in the same cache, which
skips the task results already written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchutil import ROOT, table, write_section

HERE = Path(__file__).resolve().parent
SCENES, REF_PER_CLASS, DIM = 30, 300, 256


def vm_hwm_gib(pid="self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def hashes_of(n: int, start: int = 0) -> list[str]:
    return [f"{i:040x}" for i in range(start, start + n)]  # sort as they are numbered


def generate(n: int, seed: int, work: Path) -> dict:
    """The store (corpus rows, then the reference rows) and its plan."""
    from rsprune.cache import save_npy
    from rsprune.embed_store import shard_plan
    from selection_scale import reference, synthetic

    emb, _ = synthetic(n, DIM, SCENES, seed, dtype=np.float16)
    ref, labels = reference(DIM, SCENES, REF_PER_CLASS, seed)
    rows = np.concatenate([emb, ref.astype(np.float16)])
    del emb
    key = f"synthetic-{n}-{seed}"
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    plan = shard_plan(hashes_of(len(rows)), 2048, key)
    at = 0
    for k, h in plan:
        save_npy(store / f"{k}.ids.npy", np.asarray(h), checksum=True)
        save_npy(store / f"{k}.npy", rows[at:at + len(h)], checksum=True)
        at += len(h)
    np.save(work / "ref_labels.npy", labels)
    return dict(rows=len(rows), store_gib=rows.nbytes / 2**30)


def child(n: int, seed: int, engine: str, workers: int, work: Path, kill_after: float) -> dict:
    import pandas as pd

    from prune import methods
    from prune.outputs import Columns
    from prune.run import features, select
    from prune.state import RunState
    from rsprune.cli import compose
    from rsprune.embed_store import Store, shard_plan

    t_start = time.perf_counter()
    key = f"synthetic-{n}-{seed}"
    all_hashes = hashes_of(n + SCENES * REF_PER_CLASS)
    store = Store(shard_plan(all_hashes, 2048, key), work / "store", key, len(all_hashes), {})
    labels = np.load(work / "ref_labels.npy")
    ref = pd.DataFrame({"relpath": [f"scene{c:02d}/{i}.jpg" for i, c in enumerate(labels)], "readable": True,
                        "content_hash": all_hashes[n:]})
    idx = pd.DataFrame({"id": [f"{i:016x}" for i in range(n)], "content_hash": all_hashes[:n],
                        "entropy_sharpness": np.random.default_rng(seed).normal(4.0, 0.5, n).astype(np.float32)})
    del all_hashes
    cache = work / f"cache-{engine}"
    cfg = compose("prune", ["+experiment=ratio85", f"cache_dir={cache}", f"engine={'ray' if engine != 'local' else 'local'}",
                            f"ray.num_cpus={workers}"])
    budget = int(round((1 - float(cfg.ratio)) * n))
    run = RunState(cfg, SimpleNamespace(method=methods.get("rsprune"), budget=budget), progress=False)
    run.inputs = SimpleNamespace(corpus=idx, reference=ref, reference_key="synthetic-ref", corpus_key=key)
    run.store, run.usable, run.pool_rows = store, np.ones(n, bool), np.arange(n)
    run.pool, run.cols, run.timings["embed"] = methods.Pool(idx), Columns.empty(n), 0.0
    out = dict(n=n, engine=engine, driver_setup_gib=vm_hwm_gib())
    if engine != "local":
        from prune import engine_ray

        t0 = time.perf_counter()
        engine_ray.start_ray(cfg.ray)
        out["ray_start_s"] = time.perf_counter() - t0
        run.engine = engine_ray.RayEngine(str(cfg.cache_dir))
        if kill_after:
            threading.Thread(target=kill_busy_worker, args=(kill_after, out), daemon=True).start()
    for attempt in (1, 2):
        t0 = time.perf_counter()
        try:
            features(run)
            chosen, _ = select(run.plan, run.pool, budget, cfg)
            break
        except Exception as e:  # a killed worker's task: the rerun skips the task files written
            if attempt == 2 or not kill_after:
                raise
            out["first_run"] = f"{type(e).__name__} after {time.perf_counter() - t0:.0f} s"
            run.pool, run.cols = methods.Pool(idx), Columns.empty(n)
    out.update({f"{k}_s": v for k, v in run.timings.items() if k != "embed"})
    out["work_s"] = time.perf_counter() - t0
    out["budget"], out["chosen"] = budget, int(len(np.unique(chosen)))
    kept = np.sort(idx.id.to_numpy()[chosen].astype("U16"))
    np.save(work / f"kept-{engine}.npy", kept)
    digest = hashlib.sha256()
    for a in (kept, run.pool.scene, run.pool.cluster, run.pool.dist):
        digest.update(np.ascontiguousarray(a).tobytes())
    out["outputs_sha256"] = digest.hexdigest()
    out["clusters"] = int(run.pool.cluster.max()) + 1
    out["driver_peak_gib"] = vm_hwm_gib()
    if engine != "local":
        from prune.engine_ray import STEP_PEAK, TASK_ROWS, WORKER_PEAK

        out["worker_peak_gib"] = sorted(round(v / 2**30, 3) for v in WORKER_PEAK.values())
        out["task_rows"] = dict(TASK_ROWS)
        out["step_peak_gib"] = {k: [round(w / 2**30, 3), round(d / 2**30, 3)] for k, (w, d) in STEP_PEAK.items()}
        out["ray_tasks"] = sum(1 for _ in (cache / "ray").glob("*/*/*.npz"))
    out["wall_s"] = time.perf_counter() - t_start
    return out


def kill_busy_worker(after: float, out: dict) -> None:
    """SIGKILL a Ray worker that ran this run's tasks (`WORKER_PEAK`) while it runs a task again,
    `after` s past the first cluster task's file."""
    import psutil

    from prune.engine_ray import WORKER_PEAK

    cache, deadline = Path(os.environ["RAY_SCALE_CACHE"]), time.time() + 1800
    while time.time() < deadline and not any(cache.glob("ray/*/clusters-*/*.npz")):
        time.sleep(0.2)
    time.sleep(after)
    while time.time() < deadline:
        for pid in list(WORKER_PEAK):
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue
            if cmd.startswith("ray::") and "IDLE" not in cmd:
                os.kill(pid, signal.SIGKILL)
                out["killed"] = f"pid {pid} ({cmd[:30]}) at {time.strftime('%H:%M:%S')}"
                return
        time.sleep(0.1)


def stop_driver(n: int, args, work: Path) -> dict:
    """Start the Ray run, SIGKILL its driver and local cluster `--kill-after` s after the first
    cluster task's file, then run again in the same cache: what the rerun found written."""
    cache = work / "cache-ray-resume"
    shutil.rmtree(cache, ignore_errors=True)
    p = subprocess.Popen(child_cmd(n, args, "ray-resume", work, 0.0), cwd=ROOT, env=child_env(cache),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while p.poll() is None and not any(cache.glob("ray/*/clusters-*/*.npz")):
        time.sleep(0.2)
    time.sleep(args.kill_after)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    p.wait()
    time.sleep(2)
    written = sum(1 for _ in cache.glob("ray/*/*/*.npz"))
    r = launch(n, args, "ray-resume", work, fresh=False)
    r["killed"] = f"the driver (pid {p.pid}) and its cluster, {written} task files written"
    r["first_run"] = f"killed; the rerun ran {r['ray_tasks'] - written} of {r['ray_tasks']} tasks"
    return r


def child_env(cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", RAY_SCALE_CACHE=str(cache), RSPRUNE_CACHE=str(cache))


def child_cmd(n: int, args, engine: str, work: Path, kill_after: float) -> list[str]:
    return [sys.executable, __file__, "--child", engine, "--n", str(n), "--seed", str(args.seed),
            "--workers", str(args.workers), "--work", str(work), "--kill-after", str(kill_after)]


def launch(n: int, args, engine: str, work: Path, kill_after: float = 0.0, fresh: bool = True) -> dict:
    cache = work / f"cache-{engine}"
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    p = subprocess.run(child_cmd(n, args, engine, work, kill_after), cwd=ROOT, env=child_env(cache),
                       capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"{engine} N={n} failed:\n{p.stderr[-4000:]}")
    r = json.loads(line[0][7:])
    print(r, flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2e5,1e6")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill", default="", help="N of the killed-worker run (empty: none)")
    ap.add_argument("--kill-after", type=float, default=3.0)
    ap.add_argument("--work", default="/tmp/ray_scale")
    ap.add_argument("--local-max", default="1e7", help="the largest N also run on one process (its time and memory)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child == "gen":
        print("RESULT " + json.dumps(generate(args.n, args.seed, work)))
        return
    if args.child:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # what a one-CPU Ray task runs with: the same bits
            print("RESULT " + json.dumps(child(args.n, args.seed, args.child, args.workers, work, args.kill_after)))
        return
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        w = work / str(n)
        w.mkdir(parents=True, exist_ok=True)
        gen = launch(n, args, "gen", w)
        local = launch(n, args, "local", w) if n <= float(args.local_max) else None
        on_ray = launch(n, args, "ray", w)
        if local:
            same = np.array_equal(np.load(w / "kept-local.npy"), np.load(w / "kept-ray.npy"))
            on_ray.update(same_kept=same, x_local=local["work_s"] / on_ray["work_s"])
            local.update(same_kept="-", x_local=1.0)
            rows.append(dict(local, store_gib=gen["store_gib"]))
        rows.append(dict(on_ray, store_gib=gen["store_gib"]))
        if args.kill and int(float(args.kill)) == n:
            killed = launch(n, args, "ray-kill", w, args.kill_after)
            killed.update(same_kept=np.array_equal(np.load(w / "kept-ray.npy"), np.load(w / "kept-ray-kill.npy")),
                          x_local=local["work_s"] / killed["work_s"] if local else "-", store_gib=gen["store_gib"],
                          identical=killed["outputs_sha256"] == on_ray["outputs_sha256"])
            rows.append(killed)
            resumed = stop_driver(n, args, w)
            resumed.update(same_kept=np.array_equal(np.load(w / "kept-ray.npy"), np.load(w / "kept-ray-resume.npy")),
                           x_local=local["work_s"] / resumed["work_s"] if local else "-", store_gib=gen["store_gib"],
                           identical=resumed["outputs_sha256"] == on_ray["outputs_sha256"])
            rows.append(resumed)
        shutil.rmtree(w / "store", ignore_errors=True)  # 5 GB at 1e7
    cols = ["n", "engine", "clusters", "budget", "chosen", "scenes_s", "clusters_s", "work_s", "ray_start_s",
            "x_local", "driver_peak_gib", "worker_peak_gib", "same_kept", "outputs_sha256"]
    for r in rows:
        r["outputs_sha256"] = r["outputs_sha256"][:12]
        r["worker_peak_gib"] = ", ".join(map(str, r.get("worker_peak_gib", []))) or "-"
    text = table(cols, [[r.get(c, "-") for c in cols] for r in rows])
    print(text)
    notes = [f"{r['engine']} N={r['n']}: killed {r.get('killed')}; first run: {r.get('first_run', 'finished')}; "
             f"outputs identical to the uninterrupted Ray run: {r.get('identical')}" for r in rows if "killed" in r]
    cols_doc = ("`work_s`: scenes + clusters + selection (each run's own clock, after its setup; for Ray after "
                "the cluster started, `ray_start_s`); `x_local` = local work_s / this one's (above 1: faster); "
                "`driver_peak_gib`: the run's process (VmHWM; the Ray driver); `worker_peak_gib`: each Ray "
                "worker that ran a task (its ru_maxrss, `prune/engine_ray.py:WORKER_PEAK`); `same_kept`: the "
                "kept ids equal the local run's; `outputs_sha256`: of the kept ids, scene, cluster and centroid "
                "distance columns. Targets: a worker <= 1.5 GB, the driver <= 1 GB, the exact budget, the "
                "local kept set.")
    write_section("ray_scale", "engine=ray against one process at scale (synthetic rows)",
                  __doc__.split("\n\n", 2)[2] + "\n\n" + cols_doc + "\n\n" + text +
                  ("\n\n" + "\n".join(notes) if notes else ""))


if __name__ == "__main__":
    main()
