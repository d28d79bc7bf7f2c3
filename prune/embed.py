"""Stage 2: embed every readable, unique image of the corpus and the reference benchmark.

The store is content-addressed: items are distinct file contents (sha1), sorted, cut into
fixed-size shards; shard s holds `<key>.ids.npy` (the content hashes, in order) and `<key>.npy`
(their embeddings, float16 or float32, memory-mapped on read). A shard's key hashes the encoder
config and its content hashes, so a finished shard is never recomputed, a killed run resumes at
the first missing shard, and images shared by corpus and reference are embedded once.
All readable images are embedded, not only stage-1 survivors, so the entropy cut stays free to
change without a new embedding pass.

A vector is stored under a content hash only if the bytes it was computed from hash to it: each
file is hashed again as it is read (rsprune/fingerprint.py). A file whose bytes changed since the
index is refused (the next file with the indexed bytes, an exact duplicate, is tried instead) and
returned in `Store.refused`; prune/run.py records it unreadable with the reason. A shard missing a
refused hash is kept for this run but is not done: the next run computes it again.

Under `accelerate launch`, index shards (prune/index.py) and then embedding shards are dealt
round-robin to processes; the result is the same tables and arrays as a single process writes.

As a command, index + embed only (a cluster's GPU pass, before `prune/run.py` reads the store):
    accelerate launch --multi_gpu --num_processes N prune/embed.py +experiment=ratio85 encoder.device=auto
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N prune/embed.py ...   # N CPU processes
    python prune/embed.py +experiment=ratio85          # one process
(`accelerate launch --cpu --num_processes N` starts ONE process in accelerate 1.15.)
It takes the same config as prune/run.py and fills the same cache, so the pruning run that
follows finds every shard done.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prune.index import index_inputs
from prune.validate import validate
from rsprune.cache import CHECKSUM_SUFFIX, save_npy, stable_hash, verified
from rsprune.errors import UsageError
from rsprune.encoders import build_encoder, stack_uint8
from rsprune.fingerprint import digest
from rsprune.imageio import UnreadableImage, load_rgb, resize
from rsprune.layout import CACHE_EMBED, cache_path


DTYPES = ("float16", "float32")  # storage of the embeddings


def encoder_key(enc_cfg, dtype: str = "float16") -> str:
    """The store's key: every encoder value that changes the numbers, and the storage dtype."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(enc_cfg, resolve=True)
    for k in ("batch_size", "num_workers", "threads", "channels_last", "backend", "device"):  # speed knobs
        c.pop(k, None)
    return stable_hash("encoder", c, dtype)


CHANGED = "bytes changed since the file was indexed (its sha1 differs); not embedded"


def shard_done(store: Path, key: str, hashes: list[str] | None = None) -> bool:
    """Both files of a shard are there and match their checksums (a bad one is removed), and
    (given its planned `hashes`) it holds every one of them."""
    if not (verified(store / f"{key}.ids.npy") & verified(store / f"{key}.npy")):
        return False
    return hashes is None or np.load(store / f"{key}.ids.npy").tolist() == list(hashes)


class _Verified(torch.utils.data.Dataset):
    """Item i: the first of its candidate paths whose bytes hash to `hashes[i]`, decoded and
    resized, and the (path, reason) of every candidate refused before it."""

    def __init__(self, hashes, candidates, resolution: int):
        self.hashes, self.candidates, self.resolution = hashes, candidates, resolution

    def __len__(self):
        return len(self.hashes)

    def __getitem__(self, i):
        refused = []
        for path in self.candidates[i]:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                refused.append((path, f"no longer readable since it was indexed: {type(e).__name__}: {e.strerror or e}"))
                continue
            if digest(data) != self.hashes[i]:
                refused.append((path, CHANGED))
                continue
            try:
                return i, torch.from_numpy(resize(load_rgb(path, data), self.resolution)), refused
            except UnreadableImage as e:  # the indexed bytes decoded then; not now (memory)
                refused.append((path, str(e)))
        return i, None, refused


def _collate(items):
    return items


def embed_verified(encoder, hashes: list[str], candidates: list[list[str]], batch_size: int,
                   num_workers: int) -> tuple[list[str], np.ndarray, dict]:
    """(hashes embedded, their embeddings, {path: reason} refused) for content hashes, each read
    from the first of its candidate paths that still holds those bytes."""
    loader = torch.utils.data.DataLoader(_Verified(hashes, candidates, encoder.resolution), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False, collate_fn=_collate)
    done, out, refused = [], [], {}
    for items in loader:
        ok = [(i, x) for i, x, _ in items if x is not None]
        for _, _, r in items:
            refused.update(r)
        if ok:
            out.append(encoder(stack_uint8([x for _, x in ok])))
            done += [hashes[i] for i, _ in ok]
    return done, (np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)), refused


def shard_plan(hashes: list[str], shard_size: int, ekey: str) -> list[tuple[str, list[str]]]:
    """Sorted unique content hashes cut into (shard key, hashes) of fixed size."""
    hashes = sorted(set(hashes))
    return [(stable_hash("embed-shard", ekey, hashes[i:i + shard_size]), hashes[i:i + shard_size])
            for i in range(0, len(hashes), shard_size)]


def run_shards(plan, path_of: dict, enc_cfg, store: Path, dtype: str, rank: int = 0, world: int = 1,
               progress: bool = True) -> dict:
    """Compute this process's missing shards; returns the {path: reason} it refused.
    `path_of`: content hash -> path, or -> candidate paths (first first)."""
    mine = [(k, h) for i, (k, h) in enumerate(plan) if i % world == rank]
    todo = [(k, h) for k, h in mine if not shard_done(store, k, h)]
    if not todo:
        return {}
    if enc_cfg.get("threads"):
        torch.set_num_threads(int(enc_cfg.threads))
    encoder = build_encoder(enc_cfg)
    total = sum(len(h) for _, h in mine)
    done = total - sum(len(h) for _, h in todo)
    with tqdm(total=total, initial=done, desc=f"embed[{rank}]" if world > 1 else "embed", unit="img",
              disable=not progress) as bar:
        refused = {}
        for k, h in todo:
            cands = [[path_of[x]] if isinstance(path_of[x], str) else list(path_of[x]) for x in h]
            got, e, bad = embed_verified(encoder, h, cands, int(enc_cfg.batch_size), int(enc_cfg.num_workers))
            refused.update(bad)
            save_npy(store / f"{k}.ids.npy", np.asarray(got, dtype=np.asarray(h).dtype), checksum=True)
            save_npy(store / f"{k}.npy", e.astype(dtype), checksum=True)  # its checksum, written last, marks it there
            bar.update(len(h))
    return refused


def gather(plan, store: Path, hashes, raw: bool = False) -> np.ndarray:
    """Embeddings (float32, unit norm) for content hashes in the given order, from the store;
    `raw`: as stored (float16 rows before `unit_rows`)."""
    if not plan:
        return np.zeros((len(hashes), 0), np.float32)
    ids = []
    for k, h in plan:
        got = np.load(store / f"{k}.ids.npy")
        if not set(got.tolist()) <= set(h):  # fewer than planned: hashes refused in this run
            raise RuntimeError(f"embedding shard {k} holds other ids than planned; delete {store} to recompute")
        ids.append(got)
    bounds = np.cumsum([0] + [len(g) for g in ids])
    ids = np.concatenate(ids)  # globally sorted, since the plan cuts one sorted list
    want = np.asarray(hashes, dtype=ids.dtype)
    pos = np.searchsorted(ids, want)
    if len(want) and (pos.max() >= len(ids) or (ids[np.minimum(pos, len(ids) - 1)] != want).any()):
        raise RuntimeError("some images have no embedding in the store")
    shard = np.searchsorted(bounds, pos, side="right") - 1
    arrays = [np.load(store / f"{k}.npy", mmap_mode="r") for k, _ in plan]
    out = np.empty((len(want), arrays[0].shape[1]), arrays[0].dtype if raw else np.float32)
    for s in np.unique(shard):
        m = shard == s
        out[m] = arrays[s][pos[m] - bounds[s]]
    if arrays[0].dtype != np.float32 and not raw:  # float16 storage: restore unit norm after rounding
        unit_rows(out)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a float32 array scaled to unit norm, in place, one row at a time alike (what a
    partitioned reader (prune/engine_ray.py) does to the same stored rows)."""
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def embed_stage(items: dict, cfg, cache_dir: str, progress: bool = True, state=None):
    """Embed content hashes -> path (or candidate paths) `items`; returns (plan, store folder,
    encoder key, {path: reason} refused) once every shard exists. `cfg` needs the `encoder` and
    `embed` groups.

    `state` is an accelerate PartialState when launched on several processes.
    """
    dtype = str(cfg.embed.dtype)
    if dtype not in DTYPES:  # prune/validate.py refuses it first; other callers land here
        raise UsageError(f"embed.dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    ekey = encoder_key(cfg.encoder, dtype)
    store = cache_path(cache_dir, CACHE_EMBED, ekey)
    plan = shard_plan(list(items), int(cfg.embed.shard_size), ekey)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    refused = run_shards(plan, items, cfg.encoder, store, dtype, rank, world, progress)
    if state is not None:
        state.wait_for_everyone()
        refused = _gathered(refused)
    # Each process verified its own shards; here presence of both checksums is enough.
    missing = [k for k, _ in plan if not all((store / f"{k}{ext}{CHECKSUM_SUFFIX}").exists()
                                             for ext in (".npy", ".ids.npy"))]
    if missing:
        raise RuntimeError(f"{len(missing)} embedding shards missing after the pass in {store}")
    return plan, store, ekey, refused


def _gathered(refused: dict) -> dict:
    """Every process's refusals, on every process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return refused
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, refused)
    return {k: v for part in parts for k, v in part.items()}


@dataclass
class Store:
    """A finished embedding pass: its shard plan, folder and encoder key."""
    plan: list
    path: Path
    key: str
    images: int
    refused: dict  # path -> reason: files whose bytes changed since the index (not embedded)

    def gather(self, hashes, raw: bool = False) -> np.ndarray:
        return gather(self.plan, self.path, hashes, raw)


def embed_inputs(inputs, cfg, cache_dir: str, progress: bool = True, state=None) -> Store:
    """Stage 2 over the index tables (prune/index.py:Inputs): every readable unique corpus
    image, and the readable reference images."""
    items = collect_items(inputs.corpus, inputs.reference)
    plan, path, key, refused = embed_stage(items, cfg, cache_dir, progress, state)
    return Store(plan, path, key, len(items), refused)


def collect_items(idx, ref_idx) -> dict:
    """content hash -> candidate paths of every image the pipeline embeds: readable unique
    corpus images, then readable reference images not already in the corpus. The first path
    is the one read; the others (its exact duplicates) only if that one no longer holds the bytes."""
    usable = idx.readable & (idx.duplicate_of == "")
    items = {h: [p] for h, p in zip(idx.content_hash[usable], idx.path[usable])}
    dups = idx[idx.readable & ~usable]
    for h, p in zip(dups.content_hash, dups.path):
        if h in items and p not in items[h]:
            items[h].append(p)
    if ref_idx is not None:
        ok = ref_idx[ref_idx.readable]
        for h, p in zip(ok.content_hash, ok.path):
            if p not in items.setdefault(h, []):
                items[h].append(p)
    return items


def dist_state():
    """accelerate's PartialState when launched on several processes, else None.

    On a machine without CUDA (or with ACCELERATE_USE_CPU=1) it must be told `cpu=True`: given
    torchrun's LOCAL_RANK without it, PartialState looks for a GPU backend and silently falls
    back to a single process (accelerate 1.15), and every process would embed every shard.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"accelerate set up {state.num_processes} processes for WORLD_SIZE "
                           f"{os.environ['WORLD_SIZE']}; check the launch command")
    return state


def run(cfg, progress: bool = True) -> dict:
    """Index the corpus (and the reference when the method needs scenes), then embed; returns
    {images, shards, store, encoder_key} on the main process, {} on the others."""
    plan = validate(cfg)
    state = dist_state()
    inputs = index_inputs(plan, cfg, str(cfg.cache_dir), progress, state)  # shards split over processes
    store = embed_inputs(inputs, cfg, str(cfg.cache_dir), progress, state)
    if state is not None and not state.is_main_process:
        return {}
    out = dict(images=store.images, shards=len(store.plan), store=str(store.path), encoder_key=store.key,
               refused=store.refused)
    print(f"[embed] {store.images} distinct images in {len(store.plan)} shards -> {store.path}", flush=True)
    if store.refused:
        first, why = next(iter(store.refused.items()))
        print(f"[embed] {len(store.refused)} files refused, first: {first} ({why})", flush=True)
    return out


if __name__ == "__main__":
    from rsprune.cli import main

    main("prune", run, __doc__)
