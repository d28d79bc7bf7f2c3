"""The manifest: the one table every later stage (training, evaluation) reads.

One row per corpus file, readable or not. Its columns are declared here and checked on write
and read, so a stage never reads a column by position or under another name.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from rsprune.cache import load_table, save_table

MANIFEST_COLUMNS = ["id", "path", "readable", "error", "entropy_global", "entropy_local", "stage1_kept",
                    "scene", "scene_similarity", "cluster", "centroid_distance", "selected", "reason"]
SCHEMA_VERSION = 1


def write_manifest(path: str | os.PathLike, df: pd.DataFrame) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    save_table(path, df[MANIFEST_COLUMNS + extra], {"schema": SCHEMA_VERSION})


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.parquet"
    df = load_table(path, columns=MANIFEST_COLUMNS)
    if df is None:
        raise FileNotFoundError(f"no manifest at {path}")
    return df


KEPT = "kept.txt"        # a prune run's selection, one path a line
SUMMARY = "summary.json"  # a prune run's summary: its sha256 identifies the run downstream


def kept_file(spec: str | os.PathLike) -> Path:
    """The kept list of `spec`: a list file, or a prune run folder holding kept.txt."""
    path = Path(spec)
    return path / KEPT if path.is_dir() else path


def read_kept(spec: str | os.PathLike) -> list[str]:
    """Selected paths of a prune run, absolute: `spec` is a kept.txt (or any list file) or a run folder.

    The one reader of selections: rsprune.corpus.read_list's rules ('#' comments, a `# base:`
    header, otherwise relative lines relative to the list's folder, so a run folder moved together
    with its images still works). Existence is the caller's check (training counts missing files).
    """
    from rsprune.corpus import read_list

    path = kept_file(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no kept list at {path}")
    return read_list(path)


def prune_run_hash(spec: str | os.PathLike) -> dict:
    """What identifies the subset a training run used: sha256 of the kept list and, when the list
    sits in a prune run folder, of that run's summary.json (None otherwise)."""
    import hashlib

    path = kept_file(spec)
    summary = path.parent / SUMMARY
    return {"kept": str(path.resolve()), "kept_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "summary_sha256": hashlib.sha256(summary.read_bytes()).hexdigest() if summary.is_file() else None}
