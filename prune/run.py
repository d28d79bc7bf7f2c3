"""Prune an RS corpus to an exact budget: `python prune/run.py +experiment=ratio85 [key=value ...]`.

Stages (each its own module, each cached under `cache_dir` by a key of its config and inputs):
index -> entropy filter -> embed -> scenes -> stratified clusters -> selection. Writes
manifest.parquet, kept.txt, summary.json and report/*.png into `run_dir`.

This module only orchestrates: the config is checked in prune/validate.py before any stage
runs, each stage owns its cache and gets its own config group, and prune/outputs.py builds
what the run folder holds.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace

import numpy as np
from omegaconf import DictConfig

from prune import methods
from prune.cluster import cluster_stage
from prune.embed import dist_state, embed_inputs
from prune.engine_ray_run import engine_of
from prune.entropy import stage1_pool
from prune.index import index_inputs, mark_duplicates
from prune.outputs import Columns, build_manifest, build_summary, reasons, write_outputs
from prune.scenes import folder_scenes, scene_stage
from prune.validate import validate
from rsprune.cache import stable_hash
from rsprune.cli import UsageError, main


def log(msg: str) -> None:
    print(msg, flush=True)


class Timings(dict):
    """Seconds per stage: `with timings("index"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self[name] = time.perf_counter() - t


def check_usable(idx, budget: int) -> np.ndarray:
    """The usable mask (readable, first of its bytes); UsageError, saying what is wrong with
    the files, if the budget cannot be met."""
    usable = (idx.readable & (idx.duplicate_of == "")).to_numpy()
    if usable.sum() >= budget:
        return usable
    errors = idx.error[~idx.readable].value_counts()
    why = "; ".join(f"{n} x {e}" for e, n in errors.head(3).items()) or "none unreadable"
    n_dup = int((idx.duplicate_of != "").sum())
    if not usable.any():
        raise UsageError(f"none of the {len(idx)} corpus files is a readable image ({why}); check data.corpus")
    raise UsageError(f"only {usable.sum()} of {len(idx)} corpus files are readable, unique images "
                     f"({(~idx.readable).sum()} unreadable: {why}; {n_dup} exact duplicates) for a budget "
                     f"of {budget}: fix or remove the bad files, or raise the ratio")


def add_scenes(pool, cols: Columns, inputs, store, usable, pool_rows, cfg, cached: dict) -> tuple[list[str], dict]:
    """Stage 3 into `pool.scene` and `cols`; returns the scene (reference class) names and the
    strata diagnostics (threshold, matched share, similarity quantiles, pseudo-scene sizes)."""
    idx = inputs.corpus
    if cfg.scenes.assign == "folder":
        strata, classes, info = folder_scenes(idx.relpath[usable].tolist())
        cols.scene[usable] = strata
        pool.scene = cols.scene[pool_rows]
        return classes, info
    hashes = sorted(set(idx.content_hash[usable]))
    table, classes, info, cached["scenes"] = scene_stage(store, hashes, inputs.reference, inputs.reference_key,
                                                         cfg.scenes, int(cfg.seed), str(cfg.cache_dir))
    by_hash = table.set_index("content_hash")
    cols.scene[usable] = by_hash.scene.reindex(idx.content_hash[usable]).to_numpy()
    cols.scene_similarity[usable] = by_hash.scene_similarity.reindex(idx.content_hash[usable]).to_numpy()
    pool.scene = cols.scene[pool_rows]
    return classes, info


def add_clusters(pool, cols: Columns, store, pool_rows, cfg, cached: dict, progress: bool) -> int:
    """Stage 4 (inside scene strata when there are scenes) into `pool` and `cols`; returns the
    number of strata."""
    strata = pool.scene if pool.scene is not None else np.zeros(len(pool), np.int64)
    table, pool.centroids, cached["clusters"] = cluster_stage(
        pool.emb, strata, pool.ids, pool.table.content_hash.tolist(), store.key, cfg.clustering, int(cfg.seed),
        str(cfg.cache_dir), progress)
    pool.cluster, pool.dist = table.cluster.to_numpy(), table.centroid_distance.to_numpy()
    cols.cluster[pool_rows], cols.centroid_distance[pool_rows] = pool.cluster, pool.dist
    return len(np.unique(strata))


def refuse_changed(df, refused: dict):
    """The index table with the files embedding refused (bytes changed since the index) recorded
    unreadable, with the reason, and the exact duplicates marked again without them."""
    if df is None or not refused:
        return df
    bad = df.path.isin(list(refused)).to_numpy()
    if not bad.any():
        return df
    df = df.copy()
    df.loc[bad, "readable"] = False
    df.loc[bad, "error"] = df.path[bad].map(refused)
    df.loc[bad, "content_hash"] = ""  # its bytes are not the indexed ones: no twin of anything
    df["duplicate_of"] = mark_duplicates(df)
    return df


def embed(plan, inputs, cfg, t: Timings, progress: bool, state):
    """Stage 2 when the method needs it: (inputs with refused files recorded, store or None)."""
    if not plan.method.NEEDS:
        return inputs, None
    with t("embed"):
        store = embed_inputs(inputs, cfg, str(cfg.cache_dir), progress, state)
    if store.refused:
        first, why = next(iter(store.refused.items()))
        log(f"[embed] {len(store.refused)} files refused, recorded unreadable; first: {first} ({why})")
        inputs = replace(inputs, corpus=refuse_changed(inputs.corpus, store.refused),
                         reference=refuse_changed(inputs.reference, store.refused),
                         corpus_key=stable_hash(inputs.corpus_key, sorted(store.refused.items())))
    return inputs, store


def features(plan, inputs, store, pool, cols: Columns, usable, pool_rows, cfg, t: Timings, cached: dict,
             progress: bool, state) -> tuple[list[str] | None, dict]:
    """Stages 3-4 as the method needs them, on the embeddings of `store`; returns (scene names,
    strata diagnostics): (None, {}) without scenes, and on a process other than the main one,
    whose share of the work ends with the embedding."""
    if store is None or (state is not None and not state.is_main_process):
        return None, {}
    pool.emb = store.gather(pool.table.content_hash.tolist())
    log(f"[embed] {store.images} distinct images in {len(store.plan)} shards, dim {pool.emb.shape[1]} "
        f"({t['embed']:.1f} s)")
    classes, info = None, {}
    if "scenes" in plan.method.NEEDS:
        with t("scenes"):
            classes, info = add_scenes(pool, cols, inputs, store, usable, pool_rows, cfg, cached)
        log(f"[scenes] {len(classes)} corpus class folders as strata" if cfg.scenes.assign == "folder" else
            f"[scenes] {len(classes)} reference scenes, threshold {info['threshold']:.3f} ({info['rule']}): "
            f"{info['matched_share']:.0%} matched, {info['pseudo_scenes']} pseudo-scenes ({t['scenes']:.1f} s)")
    if "clusters" in plan.method.NEEDS:
        with t("clusters"):
            n_strata = add_clusters(pool, cols, store, pool_rows, cfg, cached, progress)
        log(f"[clusters] {len(np.unique(pool.cluster))} clusters over {n_strata} strata ({t['clusters']:.1f} s)")
    return classes, info


def select(plan, pool, budget: int, cfg) -> tuple[np.ndarray, dict]:
    """Stage 5: the method's choice of exactly min(budget, pool) pool positions."""
    want = min(budget, len(pool))
    chosen, notes = plan.method.select(pool, want, cfg, np.random.default_rng(int(cfg.seed)))
    chosen = np.asarray(chosen, np.int64)
    if len(np.unique(chosen)) != want:
        raise RuntimeError(f"method {cfg.method.name} chose {len(np.unique(chosen))} rows, not {want}")
    return chosen, notes


def run(cfg: DictConfig, progress: bool = True) -> dict:
    """Run the whole pipeline for one config; returns the summary dict ({} on a process other
    than the main one under `accelerate launch`)."""
    plan = validate(cfg)
    if engine_of(cfg) == "ray":  # stages 3-5 on Ray; an unknown engine is a usage error here
        from prune.engine_ray_run import run as run_on_ray

        return run_on_ray(plan, cfg, progress, sys.modules[__name__])  # this module's pieces, no import circle
    state = dist_state()
    t, cached = Timings(), {}
    with t("index"):
        inputs = index_inputs(plan, cfg, str(cfg.cache_dir), progress, state)  # shards split over processes
    idx, budget = inputs.corpus, plan.budget
    check_usable(idx, budget)  # before the embedding: a budget that cannot be met fails fast
    log(f"[index] {len(idx)} files, {(~idx.readable).sum()} unreadable, {(idx.duplicate_of != '').sum()} "
        f"exact duplicates; budget {budget} ({t['index']:.1f} s)")
    inputs, store = embed(plan, inputs, cfg, t, progress, state)
    idx = inputs.corpus
    usable = check_usable(idx, budget)

    filtered = bool(cfg.method.entropy_filter)
    with t("entropy"):
        score = idx[f"entropy_{cfg.entropy.score}"].to_numpy(np.float64)
        e = cfg.entropy
        kept1, cut, pool_rows, extra = stage1_pool(
            score, usable, idx.id.to_numpy(), float(e.floor), float(e.percentile), filtered, budget,
            area=idx.entropy_area.to_numpy(np.float64), min_area=float(e.min_area),
            sharpness=idx.entropy_sharpness.to_numpy(np.float64),
            min_sharpness=None if e.min_sharpness is None else float(e.min_sharpness))
    below = usable.sum() - kept1.sum()
    log(f"[entropy] cut {cut:.3f} bits ({cfg.entropy.score}): " + (f"{below} dropped, {kept1.sum()} kept" if filtered
        else f"{below} under it, none dropped ({cfg.method.name} does not filter)"))
    if len(extra):
        log(f"[entropy] pool {len(pool_rows)} < budget {budget}: {len(extra)} highest-entropy dropped images return")

    pool, cols = methods.Pool(idx.iloc[pool_rows].reset_index(drop=True)), Columns.empty(len(idx))
    classes, scene_info = features(plan, inputs, store, pool, cols, usable, pool_rows, cfg, t, cached, progress,
                                   state)
    if state is not None and not state.is_main_process:
        return {}

    with t("select"):
        chosen, notes = select(plan, pool, budget, cfg)
        selected = np.zeros(len(idx), bool)
        selected[pool_rows[chosen]] = True
        selected[extra] = True
    reason = reasons(idx, usable, kept1, filtered, notes, pool_rows, selected, extra)
    manifest = build_manifest(idx, kept1, cols, selected, reason, classes, scene_info)
    summary = build_summary(cfg, manifest, inputs.corpus_key, usable, cut, len(pool), budget, len(extra),
                            pool.extra, t, cached, scene_info)
    write_outputs(cfg, manifest, summary, cut)
    log(f"[select] {selected.sum()} of {len(idx)} selected (ratio {cfg.ratio}) -> {cfg.run_dir}")
    return summary


if __name__ == "__main__":
    main("prune", run, __doc__)
