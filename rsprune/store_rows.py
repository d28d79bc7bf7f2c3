"""Rows of the embedding store by integer position: what an engine's task is sent instead of
content hashes.

A store (rsprune/embed_store.py) cuts one sorted list of content hashes into shards; a row's
position is its place in the store's files, shard after shard. `table(store)` is the little a
task needs to read rows by position (each shard's key and first position, the dimension):
a few hundred bytes per 2048 rows, written once to a file every task reads. `positions` maps
content hashes to positions once, in the driver, in chunks (memory O(chunk), not O(N) strings);
`gather_at` reads rows by position, one shard mapped at a time, and gives the same bits as
`embed_store.gather` (float32, unit norm restored after float16 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 1 << 16  # hashes per step of `positions`


@dataclass(frozen=True)
class Table:
    path: str  # the store's folder
    keys: np.ndarray  # (shards,) shard keys, bytes
    starts: np.ndarray  # (shards + 1,) int64 first position of each shard, then the total
    dim: int


def file_rows(store: Path, key: str) -> int:
    return int(np.load(Path(store) / f"{key}.ids.npy", mmap_mode="r").shape[0])


def table(plan, store: Path) -> Table:
    """The store's shard table (each shard's stored row count read from its ids file header: a
    shard holds fewer rows than planned where embedding refused files)."""
    rows = [file_rows(store, k) for k, _ in plan]
    dim = int(np.load(Path(store) / f"{plan[0][0]}.npy", mmap_mode="r").shape[1]) if plan else 0
    return Table(str(store), np.asarray([k for k, _ in plan], dtype="S"), np.cumsum([0] + rows).astype(np.int64), dim)


def save(t: Table, path: Path) -> None:
    from rsprune.cache import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, path=np.asarray(t.path), keys=t.keys, starts=t.starts, dim=np.asarray(t.dim))


_LOADED: dict[str, Table] = {}  # one read per process of each table file


def load(path: str) -> Table:
    if path not in _LOADED:
        with np.load(path, allow_pickle=False) as z:
            _LOADED[path] = Table(str(z["path"]), z["keys"], z["starts"], int(z["dim"]))
    return _LOADED[path]


def positions(plan, store: Path, t: Table, hashes) -> np.ndarray:
    """Store position (int64) of each content hash, in the given order; RuntimeError for one
    with no embedding. Hashes are visited in sorted order, CHUNK at a time."""
    hashes = np.asarray(hashes, dtype=object) if not isinstance(hashes, np.ndarray) else hashes
    order = np.argsort(hashes, kind="stable")
    firsts = np.asarray([h[0] for _, h in plan])
    out = np.empty(len(hashes), np.int64)
    for c in range(0, len(order), CHUNK):
        at = order[c:c + CHUNK]
        want = np.asarray(hashes[at].tolist(), dtype=firsts.dtype)
        shard = np.maximum(np.searchsorted(firsts, want, side="right") - 1, 0)
        for s in np.unique(shard):
            m = shard == s
            key, planned = plan[s]
            short = t.starts[s + 1] - t.starts[s] != len(planned)  # refused files: read what it holds
            ids = np.load(Path(store) / f"{key}.ids.npy") if short else np.asarray(planned)
            ids = ids.astype(want.dtype)
            o = np.minimum(np.searchsorted(ids, want[m]), len(ids) - 1)
            if (ids[o] != want[m]).any():
                raise RuntimeError("some images have no embedding in the store")
            out[at[m]] = t.starts[s] + o
    return out


def gather_at(t: Table, pos: np.ndarray) -> np.ndarray:
    """Embeddings (float32, unit norm) at store positions, in the given order."""
    pos = np.asarray(pos, np.int64)
    out = np.empty((len(pos), t.dim), np.float32)
    shard = np.searchsorted(t.starts, pos, side="right") - 1
    order = np.argsort(shard, kind="stable")
    cuts = np.flatnonzero(np.diff(shard[order])) + 1
    half = False
    for rows in np.split(order, cuts) if len(pos) else []:
        s = shard[rows[0]]
        a = np.load(Path(t.path) / f"{t.keys[s].decode()}.npy", mmap_mode="r")
        out[rows] = a[pos[rows] - t.starts[s]]
        half = half or a.dtype != np.float32
        del a  # one shard mapped at a time: the pages read do not pile up in this process
    if half:  # float16 storage: restore unit norm after rounding (as embed_store.gather)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
