"""engine=ray: the tasks of stages 3-5 (scenes, clusters, selection) as Ray Data operations.

The engine only partitions and orchestrates. The stage functions (prune/scenes.py, cluster.py,
volume.py, methods/rsprune.py) hand their per-part work to `engine.map(fn, items, tag)`; in one
process that is Python's `map` (prune/state.py:LOCAL), here each item is one Ray task running
the same `fn` on the same rows in the same order, so the kept set is the same bits:

- scenes: one task per chunk of `scenes.CHUNK` rows (the chunks one process scores), then the
  pseudo-scene k-means fit on a sample and its assignment, one task per partition
  (`state.partitions`);
- clusters: a stratum needing more than max_k clusters gets its cells first (`cluster.cell_labels`:
  the fit, then per partition the assignment and the Lloyd sums), then one task per cell and per
  other stratum (`cluster.cluster_stratum`);
- selection: one task per group of whole clusters (`rsprune.cluster_groups`) for the neighbour
  distances (`volume.neighbour_stats`), the driver reduces the dimension, the median radius, the
  masses and the quotas (the same waterfill: exactly the budget), then one task per group picks
  (`rsprune.pick_clusters`).

A task gets lazy rows (`Rows`: store positions, 8 bytes a row, and the store's shard table
file) and reads its embeddings from the store both engines read, so the driver never holds the
embeddings and a task's memory follows its rows, not the corpus. Every task writes its result file
atomically under `cache_dir/ray/<run content>/<step>/` and is skipped when the file is there:
a run stopped by a killed worker is run again and finishes to the same outputs. Ray is imported
only inside functions: the plain install never needs it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsprune.cli import UsageError

ENGINES = ("local", "ray")
ROOT = Path(__file__).resolve().parents[1]
WORKER_PEAK: dict[int, int] = {}  # worker pid -> peak RSS in bytes, over this driver's maps
TASK_ROWS: dict[str, int] = {}  # step (its tag without the content key) -> the most rows one task was sent
STEP_PEAK: dict[str, tuple[int, int]] = {}  # step -> (its workers' peak RSS so far, the driver's) after it, bytes


def engine_of(cfg) -> str:
    """The engine asked for; on `ray`, what it cannot run is refused before any work."""
    e = str(cfg.engine)
    if e not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {e!r}")
    if e == "ray":
        refuse = [(cfg.method.name != "rsprune", f"method={cfg.method.name} (only rsprune)"),
                  (cfg.selection.within == "random",
                   "selection.within=random (its seed stream runs over all clusters in order)")]
        bad = [why for no, why in refuse if no]
        if bad:
            raise UsageError(f"engine=ray does not run {bad[0]}; use engine=local")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError('engine=ray needs Ray: pip install -e ".[ray]"') from None
    return e


def start_ray(rcfg) -> None:
    """Connect to `ray.address`, or start a local cluster of `ray.num_cpus` (null: all cores);
    an address that does not answer is a UsageError."""
    import logging

    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    if rcfg.address and str(rcfg.address) != "auto":
        reachable(str(rcfg.address))
    try:
        if rcfg.address:
            ray.init(address=str(rcfg.address), runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=rcfg.num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False,
                     object_store_memory=int(float(rcfg.object_store_gb) * 2**30))
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"ray.address={rcfg.address}: cannot reach a Ray cluster ({first})") from None
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per map otherwise


def reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to HOST:PORT (ray.init waits minutes on one that does not answer)."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"ray.address must be HOST:PORT or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"ray.address={address}: cannot reach a Ray cluster ({e.strerror or e})") from None


@dataclass
class Rows:
    """A task's rows, by store position (8 bytes a row): read from the store where the task
    runs, through the store's shard table file (rsprune/store_rows.py). `rows[sel]` is lazy."""
    table: str  # the shard table file
    pos: np.ndarray

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, sel) -> "Rows":
        return Rows(self.table, self.pos[sel])

    def load(self) -> np.ndarray:
        from rsprune import store_rows

        return store_rows.gather_at(store_rows.load(self.table), self.pos)


class PoolRows(Rows):
    """The pool's embeddings as the stages index them (`emb[rows]`), without holding them."""

    def __init__(self, table: str, pos, dim: int):
        super().__init__(table, np.asarray(pos, np.int64))
        self.shape = (len(self.pos), int(dim))


def _save(path: Path, result) -> None:
    from rsprune.cache import atomic_path

    parts = result if isinstance(result, tuple) else (result,)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, *(np.asarray(p) for p in parts), tuple=isinstance(result, tuple))


def _load(path: Path):
    with np.load(path, allow_pickle=False) as z:
        parts = tuple(z[f"arr_{i}"] for i in range(len(z.files) - 1))
        return parts if bool(z["tuple"]) else parts[0]


def rows_in(item) -> int:
    """The store rows an item sends (its lazy rows)."""
    parts = item if isinstance(item, tuple) else (item,)
    return sum(len(p) for p in parts if isinstance(p, Rows))


class _Task:
    """One Ray Data row = one item: `fn(item)` into its file unless the file is there."""

    def __init__(self, fn, refs, folder: Path):
        self.fn, self.refs, self.folder = fn, refs, folder

    def __call__(self, batch):
        import resource

        import ray

        for i in batch["i"]:
            out = self.folder / f"{int(i)}.npz"
            if not out.exists():
                _save(out, self.fn(ray.get(self.refs[int(i)])))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this worker's peak so far
        return {"i": batch["i"], "pid": np.full(len(batch["i"]), os.getpid()), "peak": np.full(len(batch["i"]), rss)}


class RayEngine:
    """`map` as a Ray Data map over the items (one CPU, one item per task), results by file."""

    name = "ray"

    def __init__(self, cache_dir: str):
        self.cache_dir, self.scope, self.tables = str(cache_dir), None, {}

    def table(self, store) -> str:
        """The store's shard table file (written once per store plan), which every task reads."""
        from rsprune import store_rows
        from rsprune.cache import stable_hash
        from rsprune.layout import CACHE_RAY, cache_path

        t = store_rows.table(store.plan, store.path)
        path = cache_path(self.cache_dir, CACHE_RAY, "stores", f"{stable_hash(str(store.path), t.keys.tolist())}.npz")
        if not path.exists():
            store_rows.save(t, path)
        self.tables[str(path)] = t
        return str(path)

    def lazy(self, store, hashes) -> Rows:
        """Lazy rows of content `hashes` (their store positions, found once here)."""
        from rsprune import store_rows

        path = self.table(store)
        return Rows(path, store_rows.positions(store.plan, store.path, self.tables[path], hashes))

    def rows(self, store, hashes) -> Rows:
        return self.lazy(store, hashes)

    def pool_rows(self, store, hashes) -> PoolRows:
        r = self.lazy(store, hashes)
        return PoolRows(r.table, r.pos, self.tables[r.table].dim)

    def map(self, fn, items, tag: str):
        import resource

        import ray
        import ray.data

        from rsprune.layout import CACHE_RAY, cache_path

        if self.scope is None:
            raise RuntimeError("engine=ray: the run's content key (scope) is not set")
        folder = cache_path(self.cache_dir, CACHE_RAY, self.scope, tag)
        items = list(items)
        step = re.sub(r"-[0-9a-f]{16,}", "", tag)
        TASK_ROWS[step] = max([TASK_ROWS.get(step, 0)] + [rows_in(x) for x in items])
        todo = [i for i in range(len(items)) if not (folder / f"{i}.npz").exists()]
        if todo:
            refs = {i: ray.put(items[i]) for i in todo}
            rows = (ray.data.from_items([{"i": i} for i in todo])
                    .map_batches(_Task(fn, refs, folder), batch_size=1, num_cpus=1).take_all())
            for r in rows:
                WORKER_PEAK[int(r["pid"])] = max(WORKER_PEAK.get(int(r["pid"]), 0), int(r["peak"]))
            STEP_PEAK[step] = (max(int(r["peak"]) for r in rows), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        n = len(items)
        del items  # the driver keeps no item past the map
        return (_load(folder / f"{i}.npz") for i in range(n))
