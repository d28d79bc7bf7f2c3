"""The embedding store: content-addressed shards of unit-normalised image embeddings.

Items are distinct file contents (sha1), sorted, cut into fixed-size shards; shard s holds
`<key>.ids.npy` (the content hashes, in order) and `<key>.npy` (their embeddings, float16 or
float32, memory-mapped on read). A shard's key hashes the encoder config and its content hashes,
so a finished shard is never recomputed, a killed pass resumes at the first missing shard, and
images shared by two sets are embedded once.

A vector is stored under a content hash only if the bytes it was computed from hash to it: each
file is hashed again as it is read (rsprune/fingerprint.py). A file whose bytes changed since it
was indexed is refused (the next candidate path with those bytes, an exact duplicate, is tried
instead) and returned with its reason. A shard missing a refused hash is not done: the next pass
computes it again.

The ground floor, because pruning (prune/embed.py, stage 2) writes it and evaluation
(eval/subset_quality.py) reads the same vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rsprune.cache import CHECKSUM_SUFFIX, save_npy, stable_hash, verified
from rsprune.encoders import build_encoder, stack_uint8
from rsprune.errors import UsageError
from rsprune.fingerprint import digest
from rsprune.imageio import UnreadableImage, load_sized
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
                return i, torch.from_numpy(load_sized(path, self.resolution, data)), refused
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
            save_shard(store, k, h, got, e, dtype)
            bar.update(len(h))
    return refused


def save_shard(store: Path, key: str, planned: list[str], got: list[str], emb: np.ndarray, dtype: str) -> None:
    """A computed shard's two files: the hashes embedded (the planned ones less any refused)
    and their embeddings, the array's checksum, written last, marking it there."""
    save_npy(store / f"{key}.ids.npy", np.asarray(got, dtype=np.asarray(planned).dtype), checksum=True)
    save_npy(store / f"{key}.npy", emb.astype(dtype), checksum=True)


def shards_of(plan, hashes) -> list:
    """The plan's shards that can hold `hashes` (the plan cuts one sorted list): what a gather
    reads, so that its cost follows the rows asked for, not the size of the store."""
    if len(plan) <= 1 or not len(hashes):
        return list(plan[:1]) if len(hashes) else []
    firsts = np.asarray([h[0] for _, h in plan], np.bytes_)  # ASCII hex: bytes, not 4-byte characters
    at = np.searchsorted(firsts, np.asarray(hashes, dtype=firsts.dtype), side="right") - 1
    return [plan[i] for i in np.unique(np.maximum(at, 0))]


def gather(plan, store: Path, hashes, widen: bool = True) -> np.ndarray:
    """Embeddings (float32, unit norm) for content hashes in the given order, from the store
    (only the shards that hold them are read). `widen=False` returns them as stored (float16
    rows not yet renormalised; rsprune/unit_rows.py widens them a chunk at a time)."""
    if not plan:
        return np.zeros((len(hashes), 0), np.float32)
    dim_from = plan[0][0]
    plan = shards_of(plan, hashes)
    if not plan:
        return np.zeros((0, np.load(store / f"{dim_from}.npy", mmap_mode="r").shape[1]), np.float32)
    ids = []
    for k, h in plan:
        got = np.load(store / f"{k}.ids.npy")
        if not set(got.tolist()) <= set(h):  # fewer than planned: hashes refused in this run
            raise RuntimeError(f"embedding shard {k} holds other ids than planned; delete {store} to recompute")
        ids.append(got)
    bounds = np.cumsum([0] + [len(g) for g in ids])
    # globally sorted, since the plan cuts one sorted list; compared as ASCII bytes (a quarter of
    # the '<U40' the shards hold: 0.4 instead of 1.6 GB for each of the two at 10^7 rows)
    ids = np.concatenate([g.astype(np.bytes_) if g.dtype.kind == "U" else g for g in ids])
    want = np.asarray(hashes, dtype=ids.dtype)
    pos = np.searchsorted(ids, want)
    if len(want) and (pos.max() >= len(ids) or (ids[np.minimum(pos, len(ids) - 1)] != want).any()):
        raise RuntimeError("some images have no embedding in the store")
    shard = np.searchsorted(bounds, pos, side="right") - 1
    arrays = [np.load(store / f"{k}.npy", mmap_mode="r") for k, _ in plan]
    out = np.empty((len(want), arrays[0].shape[1]), np.float32 if widen else arrays[0].dtype)
    for s in np.unique(shard):
        m = shard == s
        out[m] = arrays[s][pos[m] - bounds[s]]
    if widen and arrays[0].dtype != np.float32:  # float16 storage: restore unit norm after rounding
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def embed_stage(items: dict, cfg, cache_dir: str, progress: bool = True, state=None, runner=None):
    """Embed content hashes -> path (or candidate paths) `items`; returns (plan, store folder,
    encoder key, {path: reason} refused) once every shard exists. `cfg` needs the `encoder` and
    `embed` groups.

    `state` is an accelerate PartialState when launched on several processes; `runner` computes
    the missing shards in place of `run_shards` (engine=ray: prune/engine_ray_embed.py).
    """
    dtype = str(cfg.embed.dtype)
    if dtype not in DTYPES:  # prune/validate.py refuses it first; other callers land here
        raise UsageError(f"embed.dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    ekey = encoder_key(cfg.encoder, dtype)
    store = cache_path(cache_dir, CACHE_EMBED, ekey)
    plan = shard_plan(list(items), int(cfg.embed.shard_size), ekey)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    refused = (runner or run_shards)(plan, items, cfg.encoder, store, dtype, rank, world, progress)
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

    def gather(self, hashes, widen: bool = True) -> np.ndarray:
        return gather(self.plan, self.path, hashes, widen)

    def only(self, hashes) -> "Store":
        """This store with only the shards holding `hashes` in its plan: what a task is sent
        (the whole plan lists every hash of the store)."""
        return replace(self, plan=shards_of(self.plan, hashes))
