"""Embeddings held as the store keeps them (float16), handed out as float32 unit rows.

The stages index the pool's embeddings a chunk, stratum or cluster at a time (`emb[rows]`);
`UnitRows` widens and renormalises only the rows asked for, with the same per-row arithmetic
as `embed_store.gather` applies to all of them, so every stage sees the same bits while the
process holds N x d x 2 bytes instead of N x d x 4 (4.8 instead of 9.5 GiB at 10^7 x 256).
"""
from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    """float32 copy of rows, each divided by its norm: what gather does to float16 storage."""
    out = np.array(x, np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


class UnitRows:
    """(n, d) float16 rows that read as float32 unit rows: `emb[rows]`, `len`, `shape`; a
    caller that needs the whole matrix (`np.asarray`) gets it widened at once."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self.shape = raw.shape

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, rows) -> np.ndarray:
        return unit(self.raw[rows])

    def __array__(self, dtype=None, copy=None):
        out = unit(self.raw)
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


def pool_rows(raw: np.ndarray):
    """What the pool holds for the store's rows: float32 storage as it is (already unit rows,
    see gather), float16 storage as `UnitRows`."""
    return raw if raw.dtype == np.float32 else UnitRows(raw)

