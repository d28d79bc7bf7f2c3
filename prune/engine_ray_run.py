"""`python prune/run.py engine=ray [ray.address=HOST:PORT]`: prune/run.py's pipeline with stages
3-5 on Ray (prune/engine_ray.py, engine_ray_select.py); index, embedding and stage 1 as in one
process, then the same manifest, summary.json and kept.txt (identical for the same seed:
tests/test_engine_ray.py). Without `ray.address` a local Ray cluster is started.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from rsprune.cli import UsageError

ENGINES = ("local", "ray")
ROOT = Path(__file__).resolve().parents[1]


def engine_of(cfg) -> str:
    """The engine asked for; on `ray`, what it cannot do yet is refused before any work."""
    e = str(cfg.get("engine", "local"))
    if e not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {e!r}")
    if e == "ray":
        refuse = [(cfg.method.name != "rsprune", f"method={cfg.method.name} (only rsprune)"),
                  (cfg.scenes.assign != "prototype", f"scenes.assign={cfg.scenes.assign} (only prototype)"),
                  (cfg.scenes.threshold == "corpus", "scenes.threshold=corpus (reference or a cosine)"),
                  (cfg.selection.within == "random", "selection.within=random (its seed stream runs over clusters in order)")]
        bad = [why for no, why in refuse if no]
        if bad:
            raise UsageError(f"engine=ray does not run {bad[0]} yet; use engine=local")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError('engine=ray needs Ray: pip install -e ".[ray]"') from None
        rows = cfg.ray.partition_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise UsageError(f"ray.partition_rows must be a positive integer, got {rows!r}")
    return e


def start_ray(rcfg) -> None:
    """Connect to `ray.address`, or start a local cluster of `ray.num_cpus` (null: all cores)."""
    import os

    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    if rcfg.address:
        ray.init(address=str(rcfg.address), runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=rcfg.num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False,
                 object_store_memory=int(rcfg.object_store_gb * 2**30))
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per map otherwise


class StoreSource:
    """Partitions of the usable rows (content-hash order) read from the single-process store."""

    def __init__(self, store, work: Path, n_parts: int):
        self.plan, self.path, self.work, self.n_parts = store.plan, store.path, work, n_parts

    def load(self, p: int) -> dict:
        from prune.embed import gather
        from prune.engine_ray import load

        d = load(self.work / "parts" / f"{p}.npz")
        d["raw"] = gather(self.plan, self.path, d.pop("hash").tolist(), raw=True)
        return d


def write_parts(idx, usable, pool_rows, work: Path, rows_per_part: int) -> int:
    """The partition tables: usable rows sorted by content hash, with pool position and key."""
    from prune.engine_ray import save
    from rsprune.exact import hash_keys

    rows = np.flatnonzero(usable)
    hashes = idx.content_hash.to_numpy()[rows].astype(str)
    order = np.argsort(hashes, kind="stable")
    rows, hashes = rows[order], hashes[order]
    pos = np.full(len(idx), -1, np.int64)
    pos[pool_rows] = np.arange(len(pool_rows))
    ids = idx.id.to_numpy()
    n_parts = max(1, -(-len(rows) // rows_per_part))
    for p in range(n_parts):
        s = slice(p * rows_per_part, (p + 1) * rows_per_part)
        r = rows[s]
        save(work / "parts" / f"{p}.npz", row=r, pos=pos[r], hrank=np.arange(len(rows))[s], key=hash_keys(hashes[s]),
             id=ids[r].astype(str), hash=hashes[s])
    return n_parts


def reference_scenes(inputs, store, cfg):
    """(prototypes, their class, threshold, rule, class names, held-out scores), as scene_stage."""
    from prune.scenes import calibrate, heldout_scores, prototypes, reference_labels

    c, seed = cfg.scenes, int(cfg.seed)
    ok = inputs.reference[inputs.reference.readable]
    labels, classes = reference_labels(ok.relpath.tolist())
    emb_ref = store.gather(ok.content_hash.tolist())
    protos, owner = prototypes(emb_ref, labels, int(c.per_class), seed)
    held = heldout_scores(emb_ref, labels, "prototype", int(c.per_class), int(c.knn), seed)
    threshold, rule = calibrate(c.threshold, float(c.quantile), np.zeros(0), lambda: held)
    return protos, owner, threshold, rule, classes, held


def ray_features(plan, inputs, store, pool, cols, usable, pool_rows, cfg, budget: int, t, cached):
    """Stages 3-5 on Ray: (scene names, strata diagnostics, chosen pool positions, notes)."""
    from prune import engine_ray, engine_ray_select
    from prune.scenes import diagnostics
    from rsprune.cache import stable_hash
    from rsprune.layout import cache_path

    idx, seed = inputs.corpus, int(cfg.seed)
    conf = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("run_dir", "ray", "report")}
    work = Path(cache_path(str(cfg.cache_dir), "ray", stable_hash("ray-run", conf, inputs.corpus_key, store.key)))
    start_ray(cfg.ray)
    n_parts = write_parts(idx, usable, pool_rows, work, int(cfg.ray.partition_rows))
    src = StoreSource(store, work, n_parts)
    with t("scenes"):
        protos, owner, threshold, rule, classes, held = reference_scenes(inputs, store, cfg)
        sc = engine_ray.scenes(src, protos, owner, threshold, len(classes), cfg.scenes.pseudo_size, seed, work)
    n_buckets = max(1, -(-len(pool) // int(cfg.ray.partition_rows)))
    with t("clusters"):
        strata_plan = engine_ray.plan_strata(sc["counts"], cfg.clustering, seed)
        engine_ray.clusters(src, strata_plan, cfg.clustering, work, n_buckets)
    with t("select"):
        out = engine_ray_select.select(cfg, min(budget, len(pool)), work, n_buckets)
    rows, strata, score = [], [], []
    for p in range(n_parts):
        part, sp, st = (engine_ray.load(work / d / f"{p}.npz") for d in ("parts", "scene", "strata"))
        rows.append(part["row"]), strata.append(st["stratum"]), score.append(sp["score"])
    rows, strata, score = np.concatenate(rows), np.concatenate(strata), np.concatenate(score)
    cols.scene[rows], cols.scene_similarity[rows] = strata, score
    pool.scene = cols.scene[pool_rows]
    chosen, notes = [], {}
    for b in range(n_buckets):
        z = engine_ray.load(work / "out" / f"{b}.npz")
        cols.cluster[pool_rows[z["pos"]]], cols.centroid_distance[pool_rows[z["pos"]]] = z["cluster"], z["dist"]
        chosen.append(z["pos"][z["selected"]])
        notes.update({int(q): "pruned_near_duplicate" for q in z["pos"][z["near_duplicate"]]})
    pool.extra.update(out["method_info"])
    info = diagnostics(strata, score, threshold, rule, len(classes), sc["k_pseudo"], cfg.scenes.pseudo_size, held)
    cached["ray_work"] = str(work)
    return classes, info, np.concatenate(chosen), notes


def run(plan, cfg, progress: bool, local) -> dict:
    """prune/run.py's run() with stages 3-5 on Ray; `local` is prune/run.py (its Timings,
    check_usable, embed and log)."""
    from prune import methods
    from prune.entropy import stage1_pool
    from prune.index import index_inputs
    from prune.outputs import Columns, build_manifest, build_summary, reasons, write_outputs

    t, cached = local.Timings(), {}
    with t("index"):
        inputs = index_inputs(plan, cfg, str(cfg.cache_dir), progress, None)
    budget = plan.budget
    local.check_usable(inputs.corpus, budget)
    inputs, store = local.embed(plan, inputs, cfg, t, progress, None)
    idx = inputs.corpus
    usable = local.check_usable(idx, budget)
    e = cfg.entropy
    with t("entropy"):
        kept1, cut, pool_rows, extra = stage1_pool(
            idx[f"entropy_{e.score}"].to_numpy(np.float64), usable, idx.id.to_numpy(), float(e.floor),
            float(e.percentile), bool(cfg.method.entropy_filter), budget, area=idx.entropy_area.to_numpy(np.float64),
            min_area=float(e.min_area), sharpness=idx.entropy_sharpness.to_numpy(np.float64),
            min_sharpness=None if e.min_sharpness is None else float(e.min_sharpness))
    pool, cols = methods.Pool(idx.iloc[pool_rows].reset_index(drop=True)), Columns.empty(len(idx))
    classes, info, chosen, notes = ray_features(plan, inputs, store, pool, cols, usable, pool_rows, cfg, budget, t,
                                                cached)
    if len(np.unique(chosen)) != min(budget, len(pool)):
        raise RuntimeError(f"engine=ray chose {len(np.unique(chosen))} rows, not {min(budget, len(pool))}")
    selected = np.zeros(len(idx), bool)
    selected[pool_rows[chosen]] = True
    selected[extra] = True
    reason = reasons(idx, usable, kept1, bool(cfg.method.entropy_filter), notes, pool_rows, selected, extra)
    manifest = build_manifest(idx, kept1, cols, selected, reason, classes, info)
    summary = build_summary(cfg, manifest, inputs.corpus_key, usable, cut, len(pool), budget, len(extra),
                            pool.extra, t, cached, info)
    write_outputs(cfg, manifest, summary, cut)
    local.log(f"[select] engine=ray: {selected.sum()} of {len(idx)} selected (ratio {cfg.ratio}) -> {cfg.run_dir}")
    return summary
