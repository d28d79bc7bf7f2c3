"""Selection methods. Each is a module with `NEEDS` (the stages it reads: "embed", "scenes",
"clusters") and `select(pool, budget, cfg, rng) -> (positions into pool, {position: reason})`.
Whether stage 1's cut applies to its pool is `method.entropy_filter` in its config.

`pool` is a Pool: the eligible rows (readable, unique, past stage 1 if it applies) with the
arrays the method needs, in pool order. The runner guarantees len(pool) >= budget.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from prune.state import LOCAL
from rsprune.columns import fixed_text
from rsprune.cli import UsageError

METHODS = ("rsprune", "random", "entropy", "kmeans_uniform", "semdedup", "prototypes", "density",
           "scene_proportional", "hkmeans")


@dataclass
class Pool:
    table: pd.DataFrame  # manifest rows of the pool (id, entropy_local, ...)
    emb: np.ndarray | None = None  # (n, d) unit embeddings
    scene: np.ndarray | None = None  # scene index, -1 = unmatched
    cluster: np.ndarray | None = None  # global cluster id
    dist: np.ndarray | None = None  # cosine distance to the cluster centroid
    centroids: np.ndarray | None = None  # (max cluster id + 1, d) k-means centroids, row = cluster id
    extra: dict = field(default_factory=dict)
    engine: Any = LOCAL  # where the method's per-stratum tasks run (prune/state.py)

    def __len__(self):
        return len(self.table)

    @property
    def ids(self) -> np.ndarray:
        """The ids, compact where they can be (rsprune/columns.py): the same order and ties."""
        return fixed_text(self.table["id"])


def get(name: str):
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"prune.methods.{name}")
