"""engine=ray for stages 0-1: the index pass as Ray Data operations, and the entropy cut from
merged histograms.

The engine only partitions and orchestrates; every row comes from the functions one process
runs (prune/index.py, prune/entropy.py), so the table and the cut are the same bits:

- scan: one task per index shard (`index.scan_shard`: the shard's cache file, or scan_file over
  its files and the file written). A rerun skips every shard already written.
- exact duplicates: a sort shuffle on the content hash counts each hash; only the rows of
  hashes seen twice come back to the driver, where `index.mark_duplicates` (the first by id of
  its bytes) marks them, as it marks the whole table in one process.
- partitions: one task per `index.partition_rows` rows (whole shards) writes that slice of
  the table, with an integer `row` (its position in the walk), as parquet under
  `cache_dir/index/parts/<index key>/`, atomically, skipped when there. The driver then reads
  the partitions into the table the later stages take (and the cache file both engines find).
- entropy cut: `np.percentile` of the usable scores, found without sorting them in one place:
  passes of 4096-bin histograms over the float64 bit patterns (one task per partition, merged
  on the driver) narrow the two order statistics numpy interpolates between to one bin, whose
  values come back; numpy's linear interpolation then gives the same float.

Ray is imported only inside functions: the plain install never needs it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd

from prune.index import COLUMNS, join_scans, mark_duplicates, scan_shard, shard_chunks
from rsprune.cache import load_table, save_table, stable_hash, table_meta, verified
from rsprune.layout import CACHE_INDEX, cache_path

BITS = 12  # histogram digits: 4096 bins a pass
LIMIT = 1 << 16  # values of one bin brought back to the driver


@contextlib.contextmanager
def sort_shuffle():
    """Ray Data's sort-based shuffle for this block: the hash shuffle starts aggregator actors
    (17 s against 0.8 s for a small groupby on 2 CPUs)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    was, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = was


class _Scan:
    """Ray Data batch of shard numbers -> (id, content_hash) of their rows that have bytes."""

    def __init__(self, chunks, params: dict, cache_dir: str):
        self.chunks, self.params, self.cache_dir = chunks, params, cache_dir

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import ray

        out = []
        for s in batch["s"]:
            chunk = ray.get(self.chunks[int(s)])
            part = scan_shard(chunk, self.params, self.cache_dir, 0)  # the task is the parallel unit
            has = (part.content_hash != "").to_numpy()
            out.append(pd.DataFrame({"id": chunk.id.to_numpy()[has], "content_hash": part.content_hash[has].to_numpy()}))
        return pd.concat(out, ignore_index=True)


def _in_set(hashes):
    def keep(batch: pd.DataFrame) -> pd.DataFrame:
        return batch[batch.content_hash.isin(hashes)]
    return keep


class _Part:
    """Ray Data batch of partition numbers -> their table slices written (rows each)."""

    def __init__(self, chunks, per: int, dups, key: str, cache_dir: str, params: dict):
        self.chunks, self.per, self.dups, self.key, self.cache_dir, self.params = chunks, per, dups, key, cache_dir, params

    def __call__(self, batch: dict) -> dict:
        import ray

        dups = ray.get(self.dups)
        n = []
        for p in batch["p"]:
            p = int(p)
            chunks = [ray.get(c) for c in self.chunks[p * self.per:(p + 1) * self.per]]
            files = pd.concat(chunks)
            scanned = pd.concat([scan_shard(c, self.params, self.cache_dir, 0) for c in chunks], ignore_index=True)
            df = join_scans(files, scanned)
            df["duplicate_of"] = df.id.map(dups).fillna("").astype(object)
            df = df[COLUMNS]
            df.insert(0, "row", np.arange(len(df), dtype=np.int64) + int(files.index[0]))
            path, pkey = part_path(self.cache_dir, self.key, p)
            save_table(path, df, {"key": pkey}, checksum=True)
            n.append(len(df))
        return {"p": batch["p"], "n": np.asarray(n, np.int64)}


def part_path(cache_dir: str, key: str, p: int):
    """Partition p of the index `key`: its parquet file and the key it is written under."""
    return cache_path(cache_dir, CACHE_INDEX, "parts", key, f"{p:05d}.parquet"), stable_hash("index-part", key, p)


def _part_done(cache_dir: str, key: str, p: int) -> bool:
    path, pkey = part_path(cache_dir, key, p)
    return verified(path) and table_meta(path).get("key") == pkey


def ray_index(files: pd.DataFrame, params: dict, key: str, final, index_cfg, cache_dir: str, progress=False,
              state=None) -> pd.DataFrame:
    """The index table of `files` (prune/index.py:build_index's, the same rows) computed as Ray
    Data operations over shards and partitions; saved at `final` as one process saves it. Takes
    `_scan_shards`'s arguments (`progress` and `state` unused: the cluster is the one process)."""
    import ray
    import ray.data

    files = files.reset_index(drop=True)
    chunks = shard_chunks(files, int(index_cfg.shard_size))
    per = max(1, int(index_cfg.partition_rows) // int(index_cfg.shard_size))
    n_parts = -(-len(chunks) // per)
    todo = [p for p in range(n_parts) if not _part_done(cache_dir, key, p)]
    if todo:
        refs = [ray.put(c) for c in chunks]
        # Every shard scanned (or found), keeping (id, content hash) of rows that have bytes.
        rows = (ray.data.from_items([{"s": s} for s in range(len(chunks))])
                .map_batches(_Scan(refs, params, cache_dir), batch_size=1, num_cpus=1, batch_format="pandas")
                .materialize())
        with sort_shuffle():
            counts = rows.groupby("content_hash", num_partitions=max(1, n_parts)).count().to_pandas() \
                if rows.count() else pd.DataFrame({"content_hash": [], "count()": []})
        twice = counts.content_hash[counts["count()"] > 1].tolist()
        dups = {}
        if twice:
            same = rows.map_batches(_in_set(set(twice)), batch_format="pandas").to_pandas()
            marked = mark_duplicates(same)
            dups = dict(zip(same.id[marked != ""], marked[marked != ""]))
        (ray.data.from_items([{"p": p} for p in todo])
         .map_batches(_Part(refs, per, ray.put(dups), key, cache_dir, params), batch_size=1, num_cpus=1)
         .take_all())
    parts = [load_table(*part_path(cache_dir, key, p), verify=True) for p in range(n_parts)]
    if any(p is None for p in parts):
        raise RuntimeError(f"index partitions missing after the Ray pass in {cache_path(cache_dir, CACHE_INDEX, 'parts', key)}")
    df = pd.concat(parts, ignore_index=True).drop(columns="row")
    df["duplicate_of"] = df.duplicate_of.astype(object)  # as mark_duplicates makes it (parquet reads str)
    save_table(final, df, {"key": key}, checksum=True)
    return df


# --- the entropy cut -------------------------------------------------------------------------

def _keys(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 in the same order (sign bit flipped, negatives reversed)."""
    u = np.ascontiguousarray(x, np.float64).view(np.uint64)
    return np.where(u >> np.uint64(63), ~u, u | np.uint64(1 << 63))


def _digit(level: int) -> tuple[int, int]:
    """(shift, width) of the bits a histogram at `level` bins by."""
    top = 64 - BITS * level
    return max(0, top - BITS), top - max(0, top - BITS)


def _under(keys: np.ndarray, prefix: int, level: int) -> np.ndarray:
    if level == 0:
        return np.ones(len(keys), bool)
    return (keys >> np.uint64(max(0, 64 - BITS * level))) == np.uint64(prefix)


class _Hist:
    """A block of scores -> for each (prefix, level), the histogram of the next digit."""

    def __init__(self, queries):
        self.queries = queries

    def __call__(self, batch: dict) -> dict:
        k = _keys(batch["data"])
        out = []
        for prefix, level in self.queries:
            shift, width = _digit(level)
            d = (k[_under(k, prefix, level)] >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            out.append(np.bincount(d.astype(np.int64), minlength=1 << BITS))
        return {"h": np.stack(out)[None]}


class _Values:
    """A block of scores -> the values under any of the (prefix, level) bins."""

    def __init__(self, queries):
        self.queries = queries

    def __call__(self, batch: dict) -> dict:
        x = np.asarray(batch["data"], np.float64)
        k = _keys(x)
        keep = np.zeros(len(x), bool)
        for prefix, level in self.queries:
            keep |= _under(k, prefix, level)
        return {"v": x[keep]}


def order_stats(ranks, run) -> dict[int, float]:
    """The values at 0-based `ranks` of the sorted scores. `run(fn, column)` applies a block
    function to every block and returns that output column concatenated over the blocks."""
    state = {r: [0, 0, r] for r in set(ranks)}  # rank -> [prefix, level, rank within the bin]
    found = {}
    while len(found) < len(state):
        open_ = {r: s for r, s in state.items() if r not in found}
        queries = sorted({(s[0], s[1]) for s in open_.values()})
        hists = run(_Hist(queries), "h").reshape(-1, len(queries), 1 << BITS).sum(axis=0)
        small = []
        for r, s in open_.items():
            h = hists[queries.index((s[0], s[1]))]
            c = np.cumsum(h)
            b = int(np.searchsorted(c, s[2], side="right"))
            s[2] -= int(c[b - 1]) if b else 0
            s[0], s[1] = (s[0] << _digit(s[1])[1]) | b, s[1] + 1
            if h[b] <= LIMIT or _digit(s[1])[1] <= 0:
                small.append(r)
        if small:
            values = run(_Values(sorted({(state[r][0], state[r][1]) for r in small})), "v")
            k = _keys(values)
            for r in small:
                s = state[r]
                found[r] = float(np.sort(values[_under(k, s[0], s[1])])[s[2]])
    return found


def percentile_of(n: int, percentile: float, run) -> float:
    """np.percentile (linear) of n scores, from `order_stats`: the same virtual index, the same
    two neighbours and numpy's interpolation, so the same float."""
    q = np.true_divide(percentile, 100)
    virtual = (n - 1) * q
    lo = int(np.floor(virtual))
    if virtual >= n - 1:
        lo = hi = n - 1
    elif virtual < 0:
        lo = hi = 0
    else:
        hi = lo + 1
    got = order_stats([lo, hi], run)
    a, b = np.float64(got[lo]), np.float64(got[hi])
    gamma = virtual - np.floor(virtual) if hi != lo else np.float64(0.0)
    diff = b - a
    out = a + diff * gamma
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else out)


def ray_entropy_cut(score: np.ndarray, usable: np.ndarray, floor: float, percentile: float, rows: int) -> float:
    """prune/entropy.py:entropy_cut(score[usable], floor, percentile), its percentile computed
    by Ray Data maps over blocks of `rows` scores."""
    import ray.data

    scores = np.asarray(score, np.float64)[usable]
    if scores.size == 0 or percentile <= 0:
        return float(floor)
    ds = ray.data.from_numpy([scores[i:i + rows] for i in range(0, len(scores), rows)])

    def run(fn, col):
        out = ds.map_batches(fn, batch_size=None, num_cpus=1, batch_format="numpy").take_all()
        return np.concatenate([np.atleast_1d(np.asarray(r[col])).ravel() for r in out]) if out else np.zeros(0)

    return float(max(floor, percentile_of(len(scores), percentile, run)))
