"""Stage 0: index the corpus, streaming, reading every file's bytes exactly once.

One pass per file: read bytes -> content hash (exact duplicates) -> decode (readable or the
error) -> entropy scores for stage 1. Files are scanned in fixed-size shards in a DataLoader
with workers; each finished shard is a parquet file, so a killed index resumes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from prune.entropy import coverage_sharpness, entropies
from rsprune.cache import load_table, rows_digest, save_table, stable_hash
from rsprune.cli import UsageError
from rsprune.corpus import list_files
from rsprune.fingerprint import digest
from rsprune.imageio import UnreadableImage, load_grey
from rsprune.layout import CACHE_INDEX, cache_path

# Part of every index cache key: bump when scan_file's output changes, so no cached shard
# from an older scorer mixes into a resumed index (2: JPEG luma decode, one-bincount entropies;
# 3: large TIFFs decimated, line-break names and memory errors recorded, stable reasons).
# 4: informative area and sharpness beside the entropies.
SCAN_VERSION = 4
# What str.splitlines() splits on: a path holding one of these cannot sit on one line of a list.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
COLUMNS = ["id", "path", "root", "relpath", "size", "content_hash", "width", "height", "bands",
           "readable", "error", "entropy_global", "entropy_local", "entropy_area", "entropy_sharpness",
           "duplicate_of"]


def walk(roots: list[str], exclude=()) -> pd.DataFrame:
    """Every image file named by the corpus entries (folders or list files, rsprune/corpus.py),
    nothing under the `exclude` folders: id, path, root, relpath, size, mtime."""
    rows = []
    for root, path, rel in list_files(roots, exclude).itertuples(index=False):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        # The id hashes the path relative to its root (with the root's name), so moving
        # the corpus keeps ids.
        rows.append((hashlib.sha1(f"{root}/{rel}".encode()).hexdigest()[:16], path, root, rel, size, mtime))
    df = pd.DataFrame(rows, columns=["id", "path", "root", "relpath", "size", "mtime"])
    if df.empty:
        raise UsageError(f"no images (jpg, jpeg, png, tif, tiff, webp) found under {', '.join(map(str, roots))}")
    if df.id.duplicated().any():
        raise UsageError("two corpus roots share a folder name and a relative path; rename one root")
    return df


def scan_file(path: str, grid: int, max_side: int, area: tuple = (8, 1.0, 205.0)) -> dict:
    """Bytes, hash, decode and entropy of one file; unreadable files get their error, any
    failure of this one file (memory included) being its error, never the run's."""
    row = dict(content_hash="", width=-1, height=-1, bands=-1, readable=False, error="",
               entropy_global=np.nan, entropy_local=np.nan, entropy_area=np.nan, entropy_sharpness=np.nan)
    if any(c in path for c in LINE_BREAKS):  # kept.txt and list files hold one path a line
        row["error"] = "file name contains a line break: it cannot be listed one path a line"
        return row
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        row["error"] = f"{type(e).__name__}: {e.strerror or e}"
        return row
    row["content_hash"] = digest(data)
    if not data:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        g, bands, (height, width) = load_grey(path, data, max_side)  # huge tiles scored on a shrunk copy
        scores = entropies(g, grid)
        cover = coverage_sharpness(g, *area)
    except UnreadableImage as e:
        row["error"] = str(e)
        return row
    except MemoryError:
        row["error"] = "MemoryError: not enough memory to decode and score this file"
        return row
    row.update(height=height, width=width, bands=bands, readable=True)
    row["entropy_global"], row["entropy_local"] = scores
    row["entropy_area"], row["entropy_sharpness"] = cover
    return row


class _Scan(torch.utils.data.Dataset):
    def __init__(self, paths, grid, max_side, area):
        self.paths, self.grid, self.max_side, self.area = paths, grid, max_side, area

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return scan_file(self.paths[i], self.grid, self.max_side, self.area)


def _columns(rows: list[dict]) -> dict[str, list]:
    # Workers send a batch as columns, not 256 dicts: a third less pickling between processes.
    return {k: [r[k] for r in rows] for k in rows[0]}


def scan(paths: list[str], grid: int, max_side: int, num_workers: int, progress=None,
         area: tuple = (8, 1.0, 205.0)) -> pd.DataFrame:
    """scan_file over paths, in order, decoded in DataLoader workers."""
    # Batches of up to 256, but at least 4 per worker so small shards still run in parallel.
    batch = max(1, min(256, -(-len(paths) // (4 * max(1, num_workers)))))
    loader = torch.utils.data.DataLoader(_Scan(paths, grid, max_side, area), batch_size=batch, shuffle=False,
                                         num_workers=num_workers, collate_fn=_columns)
    cols: dict[str, list] = {}
    for batch in loader:
        for k, v in batch.items():
            cols.setdefault(k, []).extend(v)
        if progress is not None:
            progress.update(len(v))
    return pd.DataFrame(cols)


def mark_duplicates(df: pd.DataFrame) -> pd.Series:
    """For each row, the id of the first row (by id) with the same bytes, or '' if it is the first."""
    dup = pd.Series("", index=df.index, dtype=object)
    ok = df[df.content_hash != ""].sort_values("id")
    first = ok.groupby("content_hash").id.transform("first")
    later = first != ok.id
    dup.loc[later[later].index] = first[later]
    return dup


def build_index(roots: list[str], index_cfg, entropy_cfg, cache_dir: str, progress: bool = True,
                files: pd.DataFrame | None = None, state=None, scan=None) -> tuple[pd.DataFrame, str]:
    """The cached index table (COLUMNS) and its key; `files` is walk(roots) if already done.
    `index_cfg` is the `index` config (shards, workers), `entropy_cfg` the `entropy` one (the
    scores' grid and max_side).

    `state` (an accelerate PartialState) splits the shards round-robin over the processes, as
    the embedding does; the main process then assembles the table and the others read it.
    `scan` replaces the shard pass with _scan_shards's arguments (engine=ray: prune/engine_ray_index.py).
    """
    files = walk(roots) if files is None else files
    params = dict(grid=int(entropy_cfg.grid), max_side=int(entropy_cfg.max_side), version=SCAN_VERSION,
                  area=[int(entropy_cfg.area_grid), float(entropy_cfg.flat_bits), float(entropy_cfg.bright)])
    key = stable_hash("index", params, rows_digest(files.id, files.path, files["size"], files.mtime))
    final = cache_path(cache_dir, CACHE_INDEX, f"{key}.parquet")
    df = load_table(final, key, verify=True)
    if df is None:
        df = (scan or _scan_shards)(files, params, key, final, index_cfg, cache_dir, progress, state)
    return recheck_unreadable(df, params, final, key, save=state is None or state.is_main_process), key


def shard_chunks(files: pd.DataFrame, shard_size: int) -> list[pd.DataFrame]:
    """The walk cut into index shards of `shard_size` files, in order."""
    return [files.iloc[s:s + shard_size] for s in range(0, len(files), shard_size)]


def shard_path(chunk: pd.DataFrame, params: dict, cache_dir: str) -> tuple[str, Path]:
    """A shard's key (its files and the scan parameters) and its cached parquet file."""
    skey = stable_hash("index-shard", params, chunk[["id", "path", "size", "mtime"]].values.tolist())
    return skey, cache_path(cache_dir, CACHE_INDEX, "shards", f"{skey}.parquet")


def scan_shard(chunk: pd.DataFrame, params: dict, cache_dir: str, num_workers: int, bar=None,
               cached_only: bool = False) -> pd.DataFrame | None:
    """One shard's scan_file rows: from its cache file, else scanned and saved (None when
    `cached_only` and not there). The body of a shard for every engine."""
    skey, spath = shard_path(chunk, params, cache_dir)
    part = load_table(spath, skey, verify=True)
    if part is None and not cached_only:
        part = scan(chunk.path.tolist(), params["grid"], params["max_side"], num_workers, bar, tuple(params["area"]))
        save_table(spath, part, {"key": skey}, checksum=True)
    elif part is not None and bar is not None:
        bar.update(len(chunk))
    return part


def join_scans(files: pd.DataFrame, scanned: pd.DataFrame) -> pd.DataFrame:
    """The walk's rows beside their scan_file rows (duplicate_of still to mark)."""
    return pd.concat([files.drop(columns="mtime").reset_index(drop=True), scanned.reset_index(drop=True)], axis=1)


def _scan_shards(files, params: dict, key: str, final: Path, index_cfg, cache_dir: str, progress: bool,
                 state) -> pd.DataFrame:
    """Scan the missing shards (this process's share), then assemble and save the table."""
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    chunks = shard_chunks(files, int(index_cfg.shard_size))
    parts = {}
    mine = range(rank, len(chunks), world)  # shards dealt round-robin, as the embedding's
    with tqdm(total=sum(len(chunks[i]) for i in mine), desc=f"index[{rank}]" if world > 1 else "index",
              unit="file", disable=not progress) as bar:
        for i in mine:
            parts[i] = scan_shard(chunks[i], params, cache_dir, int(index_cfg.num_workers), bar)
    if world > 1:
        state.wait_for_everyone()  # every shard is cached now
        if not state.is_main_process:
            state.wait_for_everyone()  # until the main process has written the table
            df = load_table(final, key, verify=True)
            if df is None:
                raise RuntimeError(f"the main process wrote no index table {final}")
            return df
        parts |= {i: scan_shard(chunks[i], params, cache_dir, 0, cached_only=True)
                  for i in range(len(chunks)) if i not in parts}
        if any(p is None for p in parts.values()):
            raise RuntimeError(f"index shards missing after the split pass in {cache_path(cache_dir, CACHE_INDEX)}")
    df = join_scans(files, pd.concat([parts[i] for i in range(len(chunks))], ignore_index=True))
    df["duplicate_of"] = mark_duplicates(df)
    df = df[COLUMNS]
    save_table(final, df, {"key": key}, checksum=True)
    if world > 1:
        state.wait_for_everyone()
    return df


def recheck_unreadable(df: pd.DataFrame, params: dict, path: Path, key: str, save: bool) -> pd.DataFrame:
    """Scan the rows recorded unreadable again: the key (path, size, mtime) does not change when
    a file's permissions are fixed, so a cached "unreadable" must not outlive its cause."""
    bad = np.flatnonzero(~df.readable.to_numpy(bool))
    if not len(bad):
        return df
    fresh = pd.DataFrame([scan_file(p, params["grid"], params["max_side"], tuple(params["area"])) for p in df.path.iloc[bad]])
    same = ["readable", "error", "content_hash"]
    if fresh[same].equals(df.iloc[bad][same].reset_index(drop=True)):
        return df
    df = df.copy()
    for col in fresh.columns:
        vals = df[col].to_numpy().copy()
        vals[bad] = fresh[col].to_numpy()
        df[col] = vals
    df["duplicate_of"] = mark_duplicates(df)
    if save:
        save_table(path, df, {"key": key}, checksum=True)
    return df


@dataclass
class Inputs:
    """The index tables a run reads: the corpus's, and the reference's when scenes are needed."""
    corpus: pd.DataFrame
    corpus_key: str
    reference: pd.DataFrame | None = None
    reference_key: str = ""


def index_inputs(plan, cfg, cache_dir: str, progress: bool = True, state=None, scan=None) -> Inputs:
    """Stage 0 for a validated `plan` (prune/validate.py): the corpus, then the reference."""
    idx, ikey = build_index(plan.corpus, cfg.index, cfg.entropy, cache_dir, progress, plan.files, state, scan)
    if plan.reference is None:
        return Inputs(idx, ikey)
    ref, rkey = build_index([plan.reference], cfg.index, cfg.entropy, cache_dir, progress, state=state,
                            scan=scan)
    return Inputs(idx, ikey, ref, rkey)
