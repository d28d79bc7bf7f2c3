"""The state of one pruning run: what the orchestrator owns and each step reads.

prune/run.py creates one `RunState` per run and fills it stage by stage; the steps read what
they need from it and write their results back into it, so no step takes a long list of
positional values or fills an out-parameter. The stage functions themselves (scene_stage,
cluster_stage, stage1_pool, the methods' select) stay pure: arrays and tables in, arrays and
tables out, so another engine can call them on its own partitions.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


PART = 1 << 17  # rows per partition of a big step (a multiple of knn.search's batch: the same bits whole or cut)


def partitions(n: int) -> list[slice]:
    """The row slices a step over n rows is cut into, in both engines alike."""
    return [slice(s, min(s + PART, n)) for s in range(0, n, PART)]


class HashRows:
    """Rows of content hashes in the store, gathered when indexed (`rows[sel]` is an array)."""

    def __init__(self, store, hashes):
        # the same strings, not a '<U40' copy (1.6 GB at 10^7 rows)
        self.store, self.hashes = store, hashes if isinstance(hashes, np.ndarray) else np.asarray(hashes, dtype=object)

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, sel) -> np.ndarray:
        return self.store.gather(self.hashes[sel].tolist())


class Local:
    """The single-process engine: a stage's tasks run here, one after another, in order.
    Another engine (prune/engine_ray.py) has the same `map` and runs them elsewhere."""

    name = "local"

    def map(self, fn, items, tag: str):
        """fn(item) for each item, in order (`tag` names the step for an engine that keeps files)."""
        return map(fn, items)

    def rows(self, store, hashes):
        """The embeddings of content `hashes` for a task: here, gathered now."""
        return store.gather(hashes)

    def lazy(self, store, hashes) -> HashRows:
        """Content `hashes` to index (`rows[sel]`): here, each selection gathered when asked."""
        return HashRows(store, hashes)


LOCAL = Local()


def materialize(rows):
    """A task's rows as an array: what it was given, or an engine's lazy rows (`.load()`)."""
    return rows.load() if hasattr(rows, "load") else rows


class Timings(dict):
    """Seconds per stage: `with timings("index"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self[name] = time.perf_counter() - t


@dataclass
class RunState:
    cfg: Any  # the composed prune config
    plan: Any  # prune/validate.py's Plan: method, budget, corpus entries
    progress: bool = True
    dist: Any = None  # accelerate PartialState under `accelerate launch`, else None
    timings: Timings = field(default_factory=Timings)
    cached: dict = field(default_factory=dict)  # stage -> whether its table came from the cache
    inputs: Any = None  # prune/index.py's Inputs (corpus and reference index tables, their keys)
    store: Any = None  # the embedding store, when the method needs embeddings
    usable: np.ndarray | None = None  # per corpus row: readable and first of its bytes
    kept1: np.ndarray | None = None  # per corpus row: past the entropy cut
    cut: float = float("nan")  # the entropy cut in bits
    pool_rows: np.ndarray | None = None  # corpus rows of the selection pool, in pool order
    extra: np.ndarray | None = None  # corpus rows returned by the entropy top-up
    pool: Any = None  # prune/methods Pool
    cols: Any = None  # prune/outputs.py Columns: per-row scene and cluster results
    classes: list[str] | None = None  # scene (reference class) names
    scene_info: dict = field(default_factory=dict)  # strata diagnostics
    selected: np.ndarray | None = None  # per corpus row
    engine: Any = LOCAL  # where stages 3-5 run their tasks (engine=ray: prune/engine_ray.py)

    @property
    def budget(self) -> int:
        return self.plan.budget

    @property
    def corpus(self):
        return self.inputs.corpus

    @property
    def is_main(self) -> bool:
        """False on a process other than the main one, whose share ends with the embedding."""
        return self.dist is None or self.dist.is_main_process
