"""Stage 2: embed every readable, unique image of the corpus and the reference benchmark.

The store is content-addressed: items are distinct file contents (sha1), sorted, cut into
fixed-size shards; shard s holds `<key>.ids.npy` (the content hashes, in order) and `<key>.npy`
(their embeddings, float16 or float32, memory-mapped on read). A shard's key hashes the encoder
config and its content hashes, so a finished shard is never recomputed, a killed run resumes at
the first missing shard, and images shared by corpus and reference are embedded once.
All readable images are embedded, not only stage-1 survivors, so the entropy cut stays free to
change without a new embedding pass.

Under `accelerate launch`, shards are dealt round-robin to processes; the result is the same
arrays as a single process writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rsprune.cache import save_npy, stable_hash
from rsprune.encoders import build_encoder, embed_paths


def encoder_key(enc_cfg) -> str:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(enc_cfg, resolve=True)
    for k in ("batch_size", "num_workers", "threads", "channels_last", "backend"):  # speed knobs, same output
        c.pop(k, None)
    return stable_hash("encoder", c)


def shard_plan(hashes: list[str], shard_size: int, ekey: str) -> list[tuple[str, list[str]]]:
    """Sorted unique content hashes cut into (shard key, hashes) of fixed size."""
    hashes = sorted(set(hashes))
    return [(stable_hash("embed-shard", ekey, hashes[i:i + shard_size]), hashes[i:i + shard_size])
            for i in range(0, len(hashes), shard_size)]


def run_shards(plan, path_of: dict, enc_cfg, store: Path, dtype: str, rank: int = 0, world: int = 1,
               progress: bool = True) -> int:
    """Compute this process's missing shards; returns how many it computed."""
    mine = [(k, h) for i, (k, h) in enumerate(plan) if i % world == rank]
    todo = [(k, h) for k, h in mine if not (store / f"{k}.npy").exists()]
    if not todo:
        return 0
    if enc_cfg.get("threads"):
        torch.set_num_threads(int(enc_cfg.threads))
    encoder = build_encoder(enc_cfg)
    total = sum(len(h) for _, h in mine)
    done = total - sum(len(h) for _, h in todo)
    with tqdm(total=total, initial=done, desc=f"embed[{rank}]" if world > 1 else "embed", unit="img",
              disable=not progress) as bar:
        for k, h in todo:
            e = embed_paths(encoder, [path_of[x] for x in h], int(enc_cfg.batch_size),
                            int(enc_cfg.num_workers), progress=False)
            save_npy(store / f"{k}.ids.npy", np.asarray(h))
            save_npy(store / f"{k}.npy", e.astype(dtype))  # written last: its presence marks done
            bar.update(len(h))
    return len(todo)


def gather(plan, store: Path, hashes) -> np.ndarray:
    """Embeddings (float32, unit norm) for content hashes in the given order, from the store."""
    if not plan:
        return np.zeros((len(hashes), 0), np.float32)
    ids = []
    for k, h in plan:
        got = np.load(store / f"{k}.ids.npy")
        if got.tolist() != h:
            raise RuntimeError(f"embedding shard {k} holds other ids than planned; delete {store} to recompute")
        ids.append(got)
    ids = np.concatenate(ids)  # globally sorted, since the plan cuts one sorted list
    want = np.asarray(hashes, dtype=ids.dtype)
    pos = np.searchsorted(ids, want)
    if len(want) and (pos.max() >= len(ids) or (ids[pos] != want).any()):
        raise RuntimeError("some images have no embedding in the store")
    bounds = np.cumsum([0] + [len(h) for _, h in plan])
    shard = np.searchsorted(bounds, pos, side="right") - 1
    arrays = [np.load(store / f"{k}.npy", mmap_mode="r") for k, _ in plan]
    out = np.empty((len(want), arrays[0].shape[1]), np.float32)
    for s in np.unique(shard):
        m = shard == s
        out[m] = arrays[s][pos[m] - bounds[s]]
    if arrays[0].dtype != np.float32:  # float16 storage: restore unit norm after rounding
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def embed_stage(items: dict, cfg, cache_dir: str, progress: bool = True, state=None):
    """Embed content hashes -> path `items`; returns (plan, store) once every shard exists.

    `state` is an accelerate PartialState when launched on several processes.
    """
    ekey = encoder_key(cfg.encoder)
    store = Path(cache_dir) / "embed" / ekey
    plan = shard_plan(list(items), int(cfg.embed.shard_size), ekey)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    run_shards(plan, items, cfg.encoder, store, str(cfg.embed.dtype), rank, world, progress)
    if state is not None:
        state.wait_for_everyone()
    missing = [k for k, _ in plan if not (store / f"{k}.npy").exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} embedding shards missing after the pass in {store}")
    return plan, store, ekey
