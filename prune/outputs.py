"""What a pruning run writes: the manifest (one row per corpus file, with its reason),
summary.json, kept.txt and the report figures, built from the stages' results."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from prune.scenes import UNMATCHED, scene_names
from rsprune import knn
from rsprune.cache import stable_hash, write_json, write_lines
from rsprune.manifest import write_manifest
from rsprune.markers import mark_run

PACKAGES = ("torch", "numpy", "faiss-cpu", "faiss-gpu", "pandas", "hydra-core", "transformers", "accelerate")


@dataclass
class Columns:
    """Per corpus row: what the scenes and clusters stages found (defaults where not run)."""
    scene: np.ndarray
    scene_similarity: np.ndarray
    cluster: np.ndarray
    centroid_distance: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Columns":
        return cls(np.full(n, UNMATCHED - 1, np.int64),  # -2: not assigned (no scenes stage)
                   np.full(n, np.nan, np.float32), np.full(n, -1, np.int64), np.full(n, np.nan, np.float32))


def reasons(idx: pd.DataFrame, usable, kept1, filtered: bool, notes: dict, pool_rows, selected, extra) -> np.ndarray:
    """The manifest's `reason` per corpus row; later assignments win."""
    reason = np.full(len(idx), "pruned_budget", dtype=object)
    reason[usable & ~kept1] = "pruned_low_entropy" if filtered else "pruned_budget"
    reason[(idx.duplicate_of != "").to_numpy()] = "pruned_exact_duplicate"
    reason[~idx.readable.to_numpy()] = "unreadable"
    for pos, why in notes.items():
        reason[pool_rows[pos]] = why
    reason[selected] = "selected"
    reason[extra] = "selected_entropy_topup"
    return reason


def build_manifest(idx: pd.DataFrame, kept1, cols: Columns, selected, reason, classes,
                   scene_info: dict) -> pd.DataFrame:
    m = idx.assign(stage1_kept=kept1, scene=cols.scene, scene_similarity=cols.scene_similarity,
                   cluster=cols.cluster, centroid_distance=cols.centroid_distance, selected=selected, reason=reason)
    m["scene_name"] = m.scene.map(scene_names(classes or [], scene_info.get("pseudo_scenes", 0)))
    return m


def tally(m: pd.DataFrame, usable) -> dict:
    """What summary.json counts over the manifest: totals, reasons, and per scene and per
    cluster (found, past stage 1, selected). Column reductions only, no Python step per row;
    a partitioned engine can sum these over its partitions."""
    usable = np.asarray(usable, bool)
    kept1, sel = m.stage1_kept.to_numpy(bool), m.selected.to_numpy(bool)
    cluster = m.cluster.to_numpy()
    clustered = cluster >= 0
    at = np.flatnonzero(usable)  # names are read for one row of each scene, not for every row
    per_scene = group_counts(m.scene.to_numpy()[usable], kept1[usable], sel[usable],
                             name_of=lambda rows: m.scene_name.iloc[at[rows]].tolist())
    return dict(files=len(m), unreadable=int((~m.readable.to_numpy(bool)).sum()),
                exact_duplicates=int((m.duplicate_of != "").sum()), usable=int(usable.sum()),
                stage1_dropped=int(usable.sum() - kept1.sum()), selected=int(sel.sum()),
                per_scene=per_scene, per_cluster=group_counts(cluster[clustered], kept1[clustered], sel[clustered]),
                reasons=m.reason.value_counts().to_dict())


def group_counts(key: np.ndarray, kept1: np.ndarray, selected: np.ndarray, name_of=None) -> dict:
    """{str(key): {found, stage1_kept, selected}} for integer keys in sorted key order (missing
    keys left out), counted by bincount (no hash table of the rows). With `name_of` (row
    positions -> their names, a function of the key, e.g. the scene name of a scene index) the
    keys are the names, merged where two keys share one, in sorted name order; a key whose name
    is not a str (missing) is left out."""
    key = np.asarray(key)
    if not len(key):
        return {}
    lo = int(key.min())
    at = key - lo
    found = np.bincount(at)
    k1 = np.bincount(at[np.asarray(kept1, bool)], minlength=len(found))
    sel = np.bincount(at[np.asarray(selected, bool)], minlength=len(found))
    present = np.flatnonzero(found)
    if name_of is None:
        return {str(lo + int(c)): {"found": int(found[c]), "stage1_kept": int(k1[c]), "selected": int(sel[c])}
                for c in present}
    row_of = np.empty(len(found), np.int64)
    row_of[at] = np.arange(len(at))  # any row of each key: its name is the key's name
    out = {}
    for c, name in zip(present, name_of(row_of[present])):
        if isinstance(name, str):
            t = out.setdefault(name, {"found": 0, "stage1_kept": 0, "selected": 0})
            t["found"] += int(found[c])
            t["stage1_kept"] += int(k1[c])
            t["selected"] += int(sel[c])
    return {k: out[k] for k in sorted(out)}


def build_summary(run, counts: dict) -> dict:
    """summary.json from a run's state (prune/state.py) and the manifest's `tally`."""
    cfg = run.cfg
    return dict(
        config=OmegaConf.to_container(cfg, resolve=True),
        hash=stable_hash("run", {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "run_dir"},
                         run.inputs.corpus_key),
        counts=dict(files=counts["files"], unreadable=counts["unreadable"],
                    exact_duplicates=counts["exact_duplicates"], usable=counts["usable"], entropy_cut_bits=run.cut,
                    stage1_dropped=counts["stage1_dropped"], pool=len(run.pool_rows), budget=run.budget,
                    selected=counts["selected"], entropy_topup=len(run.extra)),
        scenes=run.scene_info,  # threshold and its rule, matched share, similarity quantiles, pseudo-scene sizes
        per_scene=counts["per_scene"],
        per_cluster=counts["per_cluster"],
        reasons=counts["reasons"],
        method_info=run.pool.extra,  # e.g. the eps semdedup needed to meet the budget
        timings_s={k: round(v, 3) for k, v in run.timings.items()},
        faiss_gpu=knn.gpu_in_use(),
        cached=run.cached,
        versions=_versions(),
    )


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
    mark_run(run_dir)  # its report PNGs never become corpus images of a later walk
    write_manifest(run_dir / "manifest.parquet", manifest)
    write_lines(run_dir / "kept.txt", sorted(manifest.path[manifest.selected]))
    write_json(run_dir / "summary.json", summary)
    if cfg.report.enabled:
        from prune.report import write_report

        write_report(run_dir / "report", manifest, cut, str(cfg.entropy.score), int(cfg.report.montage_scenes),
                     int(cfg.seed), summary.get("scenes"), (summary.get("method_info") or {}).get("volume"))
