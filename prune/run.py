"""Prune an RS corpus to an exact budget: `python prune/run.py +experiment=ratio85 [key=value ...]`.

Stages (each its own module, each cached under `cache_dir` by a key of its config and inputs):
index -> entropy filter -> embed -> scenes -> stratified clusters -> selection. Writes
manifest.parquet, kept.txt, summary.json and report/*.png into `run_dir`.

This module only orchestrates: the config is checked in prune/validate.py before any stage
runs, each stage owns its cache and gets its own config group, and prune/outputs.py builds
what the run folder holds.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from omegaconf import DictConfig, OmegaConf

from prune import methods
from prune.cluster import cluster_stage, split_strata
from prune.embed import dist_state, embed_inputs
from prune.entropy import stage1_pool
from prune.index import index_inputs, mark_duplicates
from prune.outputs import Columns, build_manifest, build_summary, reasons, tally, write_outputs
from prune.scenes import folder_scenes, scene_stage
from prune.engine_ray import engine_of
from prune.state import LOCAL, RunState
from prune.validate import precheck, validate
from rsprune import runlock
from rsprune.cache import stable_hash
from rsprune.cli import UsageError, main
from rsprune.markers import mark_cache
from rsprune.columns import fixed_text
from rsprune.unit_rows import pool_rows


def log(msg: str) -> None:
    print(msg, flush=True)


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


def add_scenes(run: RunState) -> None:
    """Stage 3 into `run.pool.scene` and `run.cols`; sets the scene (reference class) names and
    the strata diagnostics (threshold, matched share, similarity quantiles, pseudo-scene sizes)."""
    idx, cfg, usable, cols = run.corpus, run.cfg, run.usable, run.cols
    if cfg.scenes.assign == "folder":
        strata, run.classes, run.scene_info = folder_scenes(idx.relpath[usable].tolist())
        cols.scene[usable] = strata
    else:
        hashes = sorted(set(idx.content_hash[usable]))
        table, run.classes, run.scene_info, run.cached["scenes"] = scene_stage(
            run.store, hashes, run.inputs.reference, run.inputs.reference_key, cfg.scenes, int(cfg.seed),
            str(cfg.cache_dir), run.engine)
        by_hash = table.set_index("content_hash")
        cols.scene[usable] = by_hash.scene.reindex(idx.content_hash[usable]).to_numpy()
        cols.scene_similarity[usable] = by_hash.scene_similarity.reindex(idx.content_hash[usable]).to_numpy()
    run.pool.scene = cols.scene[run.pool_rows]


def add_clusters(run: RunState) -> int:
    """Stage 4 (inside scene strata when there are scenes) into `run.pool` and `run.cols`;
    returns the number of strata."""
    pool, cfg = run.pool, run.cfg
    strata = pool.scene if pool.scene is not None else np.zeros(len(pool), np.int64)
    split = split_strata(strata, cfg.clustering)
    if split:  # the mean cluster size holds at any N: say what it costs instead of capping silently
        log(f"[clusters] {len(split)} strata need more than clustering.max_k={cfg.clustering.max_k} clusters "
            f"(up to {max(split.values())}): each is split into cells first")
    table, pool.centroids, run.cached["clusters"] = cluster_stage(
        pool.emb, strata, pool.table["id"], pool.table.content_hash, run.store.key, cfg.clustering, int(cfg.seed),
        str(cfg.cache_dir), run.progress, run.engine)
    pool.cluster, pool.dist = table.cluster.to_numpy(), table.centroid_distance.to_numpy()
    run.cols.cluster[run.pool_rows], run.cols.centroid_distance[run.pool_rows] = pool.cluster, pool.dist
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


def passes_on(run: RunState):
    """The engine of the index and embedding passes (None: this process, or under `accelerate
    launch` the processes split them, each taking the same path); engine=ray: Ray tasks."""
    return run.engine if run.dist is None and run.engine is not LOCAL else None


def embed(run: RunState) -> None:
    """Stage 2 when the method needs it: `run.store`, and the refused files recorded in
    `run.inputs`."""
    if not run.plan.method.NEEDS:
        return
    inputs = run.inputs
    with run.timings("embed"):
        run.store = embed_inputs(inputs, run.cfg, str(run.cfg.cache_dir), run.progress, run.dist, passes_on(run))
    refused = run.store.refused
    if refused:
        first, why = next(iter(refused.items()))
        log(f"[embed] {len(refused)} files refused, recorded unreadable; first: {first} ({why})")
        run.inputs = replace(inputs, corpus=refuse_changed(inputs.corpus, refused),
                             reference=refuse_changed(inputs.reference, refused),
                             corpus_key=stable_hash(inputs.corpus_key, sorted(refused.items())))


def entropy_pool(run: RunState) -> None:
    """Stage 1: the entropy cut, the pool of rows a method chooses from, and the top-up rows."""
    idx, cfg, e = run.corpus, run.cfg, run.cfg.entropy
    filtered = bool(cfg.method.entropy_filter)
    with run.timings("entropy"):
        score = idx[f"entropy_{e.score}"].to_numpy(np.float64)
        cut = None  # engine=ray: the same cut from merged histograms
        if run.engine is not LOCAL:
            from prune.engine_ray_index import ray_entropy_cut

            cut = ray_entropy_cut(score, run.usable, float(e.floor), float(e.percentile), int(cfg.index.partition_rows))
        run.kept1, run.cut, run.pool_rows, run.extra = stage1_pool(
            score, run.usable, fixed_text(idx.id), float(e.floor), float(e.percentile), filtered, run.budget,
            area=idx.entropy_area.to_numpy(np.float64), min_area=float(e.min_area),
            sharpness=idx.entropy_sharpness.to_numpy(np.float64),
            min_sharpness=None if e.min_sharpness is None else float(e.min_sharpness), cut=cut)
    below = run.usable.sum() - run.kept1.sum()
    log(f"[entropy] cut {run.cut:.3f} bits ({e.score}): " + (f"{below} dropped, {run.kept1.sum()} kept" if filtered
        else f"{below} under it, none dropped ({cfg.method.name} does not filter)"))
    if len(run.extra):
        log(f"[entropy] pool {len(run.pool_rows)} < budget {run.budget}: {len(run.extra)} highest-entropy "
            "dropped images return")
    run.pool = methods.Pool(idx.iloc[run.pool_rows].reset_index(drop=True))
    run.cols = Columns.empty(len(idx))


def features(run: RunState) -> None:
    """Stages 3-4 as the method needs them, on the embeddings of `run.store`; nothing without
    an embedding, and on a process other than the main one, whose share of the work ends with
    the embedding."""
    if run.store is None or not run.is_main:
        return
    t, pool, store, needs = run.timings, run.pool, run.store, run.plan.method.NEEDS
    if run.engine is LOCAL:
        pool.emb = pool_rows(store.gather(fixed_text(pool.table.content_hash), widen=False))  # float16 held
    else:  # the engine's tasks gather their own rows; this process holds none
        run.engine.scope = stable_hash("run", run.inputs.corpus_key, store.key,
                                       {k: v for k, v in OmegaConf.to_container(run.cfg).items()
                                        if k not in ("run_dir", "ray", "report")})
        pool.emb = run.engine.pool_rows(store, pool.table.content_hash.to_numpy())
        pool.engine = run.engine
    log(f"[embed] {store.images} distinct images in {len(store.plan)} shards, dim {pool.emb.shape[1]} "
        f"({t['embed']:.1f} s)")
    if "scenes" in needs:
        with t("scenes"):
            add_scenes(run)
        info = run.scene_info
        log(f"[scenes] {len(run.classes)} corpus class folders as strata" if run.cfg.scenes.assign == "folder" else
            f"[scenes] {len(run.classes)} reference scenes, threshold {info['threshold']:.3f} ({info['rule']}): "
            f"{info['matched_share']:.0%} matched, {info['pseudo_scenes']} pseudo-scenes ({t['scenes']:.1f} s)")
    if "clusters" in needs:
        with t("clusters"):
            n_strata = add_clusters(run)
        log(f"[clusters] {len(np.unique(pool.cluster))} clusters over {n_strata} strata ({t['clusters']:.1f} s)")


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
    r = RunState(cfg, validate(cfg), progress, dist_state())
    if engine_of(cfg) == "ray" and r.is_main:  # checked, and the cluster reached, before any work
        from prune.engine_ray import RayEngine, start_ray

        start_ray(cfg.ray)
        r.engine = RayEngine(str(cfg.cache_dir))
    with runlock.hold(cfg.run_dir, r.dist):  # one run per folder: a second one exits 2 naming this pid
        return _run(r, cfg, progress)


def _run(r: RunState, cfg: DictConfig, progress: bool) -> dict:
    mark_cache(cfg.cache_dir)  # no later walk takes its files for corpus images
    with r.timings("index"):
        scan = None
        if passes_on(r) is not None:
            from prune.engine_ray_index import ray_index as scan
        r.inputs = index_inputs(r.plan, cfg, str(cfg.cache_dir), progress, r.dist, scan)  # shards split
    idx = r.corpus
    check_usable(idx, r.budget)  # before the embedding: a budget that cannot be met fails fast
    log(f"[index] {len(idx)} files, {(~idx.readable).sum()} unreadable, {(idx.duplicate_of != '').sum()} "
        f"exact duplicates; budget {r.budget} ({r.timings['index']:.1f} s)")
    embed(r)
    r.usable = check_usable(r.corpus, r.budget)
    entropy_pool(r)
    features(r)
    if not r.is_main:
        return {}

    with r.timings("select"):
        chosen, notes = select(r.plan, r.pool, r.budget, cfg)
        r.selected = np.zeros(len(r.corpus), bool)
        r.selected[r.pool_rows[chosen]] = True
        r.selected[r.extra] = True
    reason = reasons(r.corpus, r.usable, r.kept1, bool(cfg.method.entropy_filter), notes, r.pool_rows, r.selected,
                     r.extra)
    manifest = build_manifest(r.corpus, r.kept1, r.cols, r.selected, reason, r.classes, r.scene_info)
    summary = build_summary(r, tally(manifest, r.usable))
    write_outputs(cfg, manifest, summary, r.cut)
    log(f"[select] {r.selected.sum()} of {len(r.corpus)} selected (ratio {cfg.ratio}) -> {cfg.run_dir}")
    return summary


if __name__ == "__main__":
    main("prune", run, __doc__, precheck)
