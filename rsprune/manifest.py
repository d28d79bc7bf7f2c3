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


def read_kept(path: str | os.PathLike) -> list[str]:
    """Selected paths of a run: a kept.txt file or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "kept.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]
