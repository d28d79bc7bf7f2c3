"""faiss-gpu against faiss-cpu on the pipeline's clustering: time, objective, assignment agreement.

`python benchmarks/gpu_faiss.py [--n 1000000]` (run by benchmarks/gpu_check.sh on a CUDA machine)

Same synthetic strata as benchmarks/kmeans_sample.py; per stratum the configured sample fit +
assignment (`+experiment=ratio85`, refine step included) once with faiss-cpu and once with
faiss-gpu (rsprune.knn use_gpu). GPU k-means is a different implementation, so the check is on quality (objective
ratio GPU/CPU, both on all points) and on the exact search: top-1 agreement of CPU and GPU
search against the same centroids.
"""
from __future__ import annotations

import argparse
import time

from benchutil import table, write_section
from kmeans_sample import faiss_fit, strata_of
from rsprune import knn


def main():
    from rsprune.cli import compose

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not knn.gpu_available():
        raise SystemExit("faiss-gpu with a visible GPU is not available here (pip install faiss-gpu-cu12?)")
    cfg = compose("prune", ["+experiment=ratio85"])
    cl, niter = cfg.clustering, int(cfg.clustering.niter)
    emb, scene = strata_of(args.n, 512, 30, args.seed, cfg)
    res = {}
    for name, on in (("faiss-cpu", False), ("faiss-gpu", True)):
        knn.use_gpu(on)
        res[name] = faiss_fit(emb, scene, cl, float(cl.sample_fraction), niter, args.seed, int(cl.refine))
        print(name, res[name], flush=True)
    knn.use_gpu(False)
    centroids, _ = knn.kmeans(emb[:200_000], 4096, seed=args.seed, niter=5)
    t = time.perf_counter()
    _, cpu_idx = knn.search(centroids, emb, 1)
    cpu_s = time.perf_counter() - t
    knn.use_gpu(True)
    t = time.perf_counter()
    _, gpu_idx = knn.search(centroids, emb, 1)
    gpu_s = time.perf_counter() - t
    knn.use_gpu(False)
    agree = float((cpu_idx[:, 0] == gpu_idx[:, 0]).mean())
    c, g = res["faiss-cpu"], res["faiss-gpu"]
    rows = [["stratified k-means (config)", c["fit_s"] + c["assign_s"], g["fit_s"] + g["assign_s"],
             (c["fit_s"] + c["assign_s"]) / (g["fit_s"] + g["assign_s"]), f"objective GPU/CPU {g['objective'] / c['objective']:.4f}"],
            [f"search {len(emb)} x 4096 centroids, top-1", cpu_s, gpu_s, cpu_s / gpu_s, f"agreement {agree:.5f}"]]
    text = table(["what", "cpu s", "gpu s", "x faster", "check"], rows)
    print(text)
    write_section("gpu_faiss", "faiss-gpu against faiss-cpu (GPU check)",
                  f"N = {len(emb)} synthetic scene-structured embeddings, d = 512.\n\n{text}", shared_note=False)
    assert g["objective"] / c["objective"] < 1.02 and agree > 0.999, "GPU results differ from the CPU ones"


if __name__ == "__main__":
    main()
