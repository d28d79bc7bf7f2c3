"""Prune an RS corpus to an exact budget: `python prune/run.py +experiment=ratio85 [key=value ...]`.

Stages (each its own module, each cached under `cache_dir` by a key of its config and inputs):
index -> entropy filter -> embed -> scenes -> stratified clusters -> selection. Writes
manifest.parquet, kept.txt, summary.json and report/*.png into `run_dir`.
"""
from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from prune import methods
from prune.budget import budget as budget_of
from prune.cluster import stratified_clusters
from prune.embed import collect_items, dist_state, embed_stage, gather
from prune.entropy import entropy_filter
from prune.index import build_index, walk
from prune.scenes import UNMATCHED, assign_scenes, reference_labels
from rsprune import knn
from rsprune.cache import cached_table, stable_hash, write_json, write_text
from rsprune.cli import UsageError, main
from rsprune.corpus import is_list
from rsprune.manifest import write_manifest

SCENE_CHUNK = 65536  # corpus rows per scene-assignment chunk
PACKAGES = ("torch", "numpy", "faiss-cpu", "faiss-gpu", "pandas", "hydra-core", "transformers", "accelerate")


def log(msg: str) -> None:
    print(msg, flush=True)


def validate(cfg: DictConfig):
    """Every check that can fail on user input, before anything is written."""
    ratio = cfg.ratio
    if not isinstance(ratio, (int, float)) or not 0 < float(ratio) < 1:
        raise UsageError(f"ratio must be a number strictly between 0 and 1 (the fraction pruned), got {ratio!r}")
    corpus = cfg.data.corpus
    corpus = [corpus] if isinstance(corpus, str) else list(corpus or [])
    if not corpus:
        raise UsageError("data.corpus is empty: give one or more folders, e.g. data.corpus=[DIR1,DIR2]")
    method = methods.get(str(cfg.method.name))
    files = walk([str(c) for c in corpus])
    ref_files, classes = None, None
    if "scenes" in method.NEEDS:
        ref = str(cfg.data.reference)
        if not (os.path.isdir(ref) or is_list(ref)):
            raise UsageError(f"reference folder (or .txt list) not found: {ref}")
        ref_files = walk([ref])
        _, classes = reference_labels(ref_files.relpath.tolist())
    if str(cfg.entropy.score) not in ("local", "global"):
        raise UsageError(f"entropy.score must be local or global, got {cfg.entropy.score!r}")
    threads = cfg.faiss.threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"faiss.threads must be a positive integer or null (all cores), got {threads!r}")
    knn.use_gpu(cfg.faiss.gpu)  # faiss.gpu=true without a GPU stops here, before anything is written
    knn.set_threads(threads)
    return corpus, method, files, classes


def run(cfg: DictConfig, progress: bool = True) -> dict:
    """Run the whole pipeline for one config; returns the summary dict."""
    corpus, method, files, classes = validate(cfg)
    state = dist_state()
    is_main = state is None or state.is_main_process
    cache = str(cfg.cache_dir)
    seed = int(cfg.seed)
    timings, cached = {}, {}

    t = time.perf_counter()
    idx, ikey = build_index(corpus, cfg, cache, progress, files, state)  # shards split over processes
    timings["index"] = time.perf_counter() - t
    n_files = len(idx)
    budget = budget_of(n_files, float(cfg.ratio))
    usable = (idx.readable & (idx.duplicate_of == "")).to_numpy()
    if usable.sum() < budget:
        raise UsageError(f"only {usable.sum()} readable unique images for a budget of {budget}; lower the ratio")
    log(f"[index] {n_files} files, {(~idx.readable).sum()} unreadable, {(idx.duplicate_of != '').sum()} "
        f"exact duplicates; budget {budget} ({timings['index']:.1f} s)")

    t = time.perf_counter()
    score = idx[f"entropy_{cfg.entropy.score}"].to_numpy(np.float64)
    kept1, cut = entropy_filter(score, usable, float(cfg.entropy.floor), float(cfg.entropy.percentile))
    timings["entropy"] = time.perf_counter() - t
    log(f"[entropy] cut {cut:.3f} bits ({cfg.entropy.score}): {usable.sum() - kept1.sum()} dropped, {kept1.sum()} kept")

    filtered = bool(cfg.method.entropy_filter)
    in_pool = kept1 if filtered else usable
    pool_rows = np.flatnonzero(in_pool)
    if len(pool_rows) < budget:  # stage 1 cut too deep for this budget: top up by entropy, said in `reason`
        extra = np.flatnonzero(usable & ~in_pool)
        extra = extra[np.lexsort((idx.id.to_numpy()[extra], -score[extra]))][:budget - len(pool_rows)]
        log(f"[entropy] pool {len(pool_rows)} < budget {budget}: {len(extra)} highest-entropy dropped images return")
    else:
        extra = np.zeros(0, np.int64)
    pool = methods.Pool(idx.iloc[pool_rows].reset_index(drop=True))

    scene_all = np.full(n_files, UNMATCHED - 1, np.int64)  # -2: not assigned (no scenes stage)
    sim_all = np.full(n_files, np.nan, np.float32)
    cluster_all = np.full(n_files, -1, np.int64)
    dist_all = np.full(n_files, np.nan, np.float32)
    if method.NEEDS:
        t = time.perf_counter()
        ref_idx, rkey = None, ""
        if "scenes" in method.NEEDS:
            ref_idx, rkey = build_index([str(cfg.data.reference)], cfg, cache, progress, state=state)
            ref_ok = ref_idx[ref_idx.readable]
        items = collect_items(idx, ref_idx)
        plan, store, ekey = embed_stage(items, cfg, cache, progress, state)
        timings["embed"] = time.perf_counter() - t
        if not is_main:
            return {}
        pool.emb = gather(plan, store, pool.table.content_hash.tolist())
        log(f"[embed] {len(items)} distinct images in {len(plan)} shards, dim {pool.emb.shape[1]} "
            f"({timings['embed']:.1f} s)")

        if "scenes" in method.NEEDS:
            t = time.perf_counter()
            ref_labels, _ = reference_labels(ref_ok.relpath.tolist())
            hashes = sorted(set(idx.content_hash[usable]))
            skey = stable_hash("scenes", ekey, rkey, hashes, OmegaConf.to_container(cfg.scenes), seed)

            def compute_scenes():
                # In chunks: a second full N x d copy of the corpus would break the memory bound at 1e6.
                ref = gather(plan, store, ref_ok.content_hash.tolist())
                parts = [assign_scenes(gather(plan, store, hashes[i:i + SCENE_CHUNK]), ref, ref_labels,
                                       str(cfg.scenes.assign), int(cfg.scenes.per_class), int(cfg.scenes.knn),
                                       float(cfg.scenes.threshold), seed)
                         for i in range(0, len(hashes), SCENE_CHUNK)]
                s, sim = (np.concatenate(p) for p in zip(*parts))
                return pd.DataFrame({"content_hash": hashes, "scene": s, "scene_similarity": sim})

            scenes, cached["scenes"] = cached_table(Path(cache) / "scenes" / f"{skey}.parquet", skey, compute_scenes)
            by_hash = scenes.set_index("content_hash")
            scene_all[usable] = by_hash.scene.reindex(idx.content_hash[usable]).to_numpy()
            sim_all[usable] = by_hash.scene_similarity.reindex(idx.content_hash[usable]).to_numpy()
            pool.scene = scene_all[pool_rows]
            timings["scenes"] = time.perf_counter() - t
            log(f"[scenes] {len(classes)} reference scenes; {(pool.scene == UNMATCHED).sum()} pool images unmatched "
                f"({timings['scenes']:.1f} s)")

        if "clusters" in method.NEEDS:
            t = time.perf_counter()
            strata = pool.scene if pool.scene is not None else np.zeros(len(pool), np.int64)
            ckey = stable_hash("clusters", ekey, strata.tolist(), pool.table.content_hash.tolist(),
                               OmegaConf.to_container(cfg.clustering), seed)

            def compute_clusters():
                c, d, _ = stratified_clusters(pool.emb, strata, cfg.clustering, seed, progress)
                return pd.DataFrame({"id": pool.ids, "cluster": c, "centroid_distance": d})

            cl, cached["clusters"] = cached_table(Path(cache) / "clusters" / f"{ckey}.parquet", ckey, compute_clusters)
            pool.cluster, pool.dist = cl.cluster.to_numpy(), cl.centroid_distance.to_numpy()
            cluster_all[pool_rows], dist_all[pool_rows] = pool.cluster, pool.dist
            timings["clusters"] = time.perf_counter() - t
            log(f"[clusters] {len(np.unique(pool.cluster))} clusters over {len(np.unique(strata))} strata "
                f"({timings['clusters']:.1f} s)")
    elif not is_main:
        return {}

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    chosen, notes = method.select(pool, min(budget, len(pool)), cfg, rng)
    chosen = np.asarray(chosen, np.int64)
    if len(np.unique(chosen)) != min(budget, len(pool)):
        raise RuntimeError(f"method {cfg.method.name} chose {len(np.unique(chosen))} rows, not {min(budget, len(pool))}")
    selected = np.zeros(n_files, bool)
    selected[pool_rows[chosen]] = True
    selected[extra] = True
    timings["select"] = time.perf_counter() - t

    reason = np.full(n_files, "pruned_budget", dtype=object)
    reason[usable & ~kept1] = "pruned_low_entropy" if filtered else "pruned_budget"
    reason[(idx.duplicate_of != "").to_numpy()] = "pruned_exact_duplicate"
    reason[~idx.readable.to_numpy()] = "unreadable"
    for pos, why in notes.items():
        reason[pool_rows[pos]] = why
    reason[selected] = "selected"
    reason[extra] = "selected_entropy_topup"

    manifest = idx.assign(stage1_kept=kept1, scene=scene_all, scene_similarity=sim_all, cluster=cluster_all,
                          centroid_distance=dist_all, selected=selected, reason=reason)
    scene_names = {i: c for i, c in enumerate(classes or [])} | {UNMATCHED: "unmatched", UNMATCHED - 1: ""}
    manifest["scene_name"] = manifest.scene.map(scene_names)
    summary = dict(
        config=OmegaConf.to_container(cfg, resolve=True),
        hash=stable_hash("run", {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "run_dir"}, ikey),
        counts=dict(files=n_files, unreadable=int((~idx.readable).sum()),
                    exact_duplicates=int((idx.duplicate_of != "").sum()), usable=int(usable.sum()),
                    entropy_cut_bits=cut, stage1_dropped=int(usable.sum() - kept1.sum()), pool=len(pool),
                    budget=budget, selected=int(selected.sum()), entropy_topup=len(extra)),
        per_scene=_per_group(manifest, "scene_name", usable),
        per_cluster=_per_group(manifest[manifest.cluster >= 0], "cluster", None),
        reasons=manifest.reason.value_counts().to_dict(),
        method_info=pool.extra,  # e.g. the eps semdedup needed to meet the budget
        timings_s={k: round(v, 3) for k, v in timings.items()},
        faiss_gpu=knn.gpu_in_use(),
        cached=cached,
        versions=_versions(),
    )
    write_outputs(cfg, manifest, summary, cut)
    log(f"[select] {selected.sum()} of {n_files} selected (ratio {cfg.ratio}) -> {cfg.run_dir}")
    return summary


def _per_group(m: pd.DataFrame, col: str, usable) -> dict:
    g = m if usable is None else m[usable]
    out = g.groupby(col).agg(found=("id", "size"), stage1_kept=("stage1_kept", "sum"), selected=("selected", "sum"))
    return {str(k): {c: int(v) for c, v in row.items()} for k, row in out.iterrows()}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def write_outputs(cfg, manifest: pd.DataFrame, summary: dict, cut: float) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(run_dir / "manifest.parquet", manifest)
    write_text(run_dir / "kept.txt", "".join(p + "\n" for p in sorted(manifest.path[manifest.selected])))
    write_json(run_dir / "summary.json", summary)
    if cfg.report.enabled:
        from prune.report import write_report

        write_report(run_dir / "report", manifest, cut, str(cfg.entropy.score), int(cfg.report.montage_scenes),
                     int(cfg.seed))


if __name__ == "__main__":
    main("prune", run, __doc__)
