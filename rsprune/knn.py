"""faiss in one place: k-means and batched nearest-neighbour search, bounded in memory.

faiss-gpu is used when it is installed with a visible GPU and `use_gpu` is on; faiss-cpu
otherwise. No N x N matrix is ever formed: searches run in row batches.
"""
from __future__ import annotations

import os

import numpy as np

# faiss's OpenMP threads spin while they wait by default; on a machine shared with other jobs that
# made k-means 3-10x slower on 2 cores (benchmarks/selection_scale.py), while passive waiting costs
# little on an idle one. Read once, when faiss (its own libgomp) loads, so set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_GPU = {"use": False, "res": None}


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_gpu(flag) -> bool:
    """GPU path: `auto` (on when faiss-gpu sees a GPU), true (required) or false; returns whether on."""
    from rsprune.cli import UsageError

    mode = str(flag).lower()
    if mode not in ("auto", "true", "false"):
        raise UsageError(f"faiss GPU setting must be auto, true or false, got {flag!r}")
    on = mode != "false" and gpu_available()
    if mode == "true" and not on:
        raise UsageError("faiss GPU requested but faiss-gpu with a visible GPU is not available; "
                         "install faiss-gpu or set the GPU setting to auto/false")
    _GPU["use"] = on
    return on


def gpu_in_use() -> bool:
    return bool(_GPU["use"])


def set_threads(n: int | None) -> None:
    """faiss (OpenMP) threads; None or 0 leaves faiss's default (all cores)."""
    import faiss

    if n:
        faiss.omp_set_num_threads(int(n))


def _gpu_resources():
    import faiss

    if _GPU["res"] is None:  # one pool of GPU scratch memory per process, not one per search
        _GPU["res"] = faiss.StandardGpuResources()
    return _GPU["res"]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _index(base: np.ndarray, metric: str):
    import faiss

    d = base.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if _GPU["use"]:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    index.add(np.ascontiguousarray(base, np.float32))
    return index


def search(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip", batch: int = 65536):
    """k nearest rows of `base` for each query: (scores, indices), in query batches.

    metric "ip" returns inner products (cosine for unit vectors), "l2" squared distances.
    """
    index = _index(base, metric)
    k = min(k, len(base))
    scores = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[s:s + batch], np.float32)
        scores[s:s + batch], idx[s:s + batch] = index.search(q, k)
    return scores, idx


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20, spherical: bool = True):
    """faiss k-means: (centroids (k, d), objective). Unit centroids when spherical."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30, gpu=_GPU["use"])
    km.train(x)
    obj = float(km.obj[-1]) if len(km.obj) else 0.0
    return np.asarray(km.centroids, np.float32), obj
