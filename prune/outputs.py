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
from rsprune.cache import stable_hash, write_json, write_text
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


def build_summary(cfg, m: pd.DataFrame, index_key: str, usable, cut: float, pool_size: int, budget: int,
                  n_topup: int, method_info: dict, timings: dict, cached: dict, scene_info: dict) -> dict:
    return dict(
        config=OmegaConf.to_container(cfg, resolve=True),
        hash=stable_hash("run", {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "run_dir"},
                         index_key),
        counts=dict(files=len(m), unreadable=int((~m.readable).sum()),
                    exact_duplicates=int((m.duplicate_of != "").sum()), usable=int(usable.sum()),
                    entropy_cut_bits=cut, stage1_dropped=int(usable.sum() - m.stage1_kept.sum()),
                    pool=pool_size, budget=budget, selected=int(m.selected.sum()), entropy_topup=n_topup),
        scenes=scene_info,  # threshold and its rule, matched share, similarity quantiles, pseudo-scene sizes
        per_scene=_per_group(m, "scene_name", usable),
        per_cluster=_per_group(m[m.cluster >= 0], "cluster", None),
        reasons=m.reason.value_counts().to_dict(),
        method_info=method_info,  # e.g. the eps semdedup needed to meet the budget
        timings_s={k: round(v, 3) for k, v in timings.items()},
        faiss_gpu=knn.gpu_in_use(),
        cached=cached,
        versions=_versions(),
    )


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
    mark_run(run_dir)  # its report PNGs never become corpus images of a later walk
    write_manifest(run_dir / "manifest.parquet", manifest)
    write_text(run_dir / "kept.txt", "".join(p + "\n" for p in sorted(manifest.path[manifest.selected])))
    write_json(run_dir / "summary.json", summary)
    if cfg.report.enabled:
        from prune.report import write_report

        write_report(run_dir / "report", manifest, cut, str(cfg.entropy.score), int(cfg.report.montage_scenes),
                     int(cfg.seed), summary.get("scenes"), (summary.get("method_info") or {}).get("volume"))
