"""Atomic writes and content keys: the two rules every cached stage follows.

A stage's output is keyed by a hash of (its config, the keys of its inputs). It is written to
a temporary name in the same folder and renamed, so a killed run never leaves a file that a
later run would take for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex digest of JSON-serialisable parts (dict keys sorted), `n` characters long."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:n]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npy(path: str | os.PathLike, a: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, a)


def save_table(path: str | os.PathLike, df, meta: dict | None = None) -> None:
    """Write a pandas table as parquet, with `meta` (config key, schema) in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        md = dict(table.schema.metadata or {})
        md[b"rsprune"] = json.dumps(meta, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(md)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def table_meta(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    raw = md.get(b"rsprune")
    return json.loads(raw) if raw else {}


def load_table(path: str | os.PathLike, key: str | None = None, columns: list[str] | None = None):
    """Read a table written by save_table; None if absent or written under another key."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        return None
    if key is not None and table_meta(path).get("key") != key:
        return None
    df = pd.read_parquet(path)
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; delete it to recompute")
    return df


def cached_table(path: str | os.PathLike, key: str, compute) -> tuple[Any, bool]:
    """(table, was_cached): the table at `path` if written under `key`, else compute and save."""
    df = load_table(path, key)
    if df is not None:
        return df, True
    df = compute()
    save_table(path, df, {"key": key})
    return df, False
