"""engine=ray for stage 2: the embedding pass as Ray Data operations, into the store both engines
read (rsprune/embed_store.py).

The store's plan is the one of a single process (sorted content hashes cut into
`embed.shard_size` shards, each keyed by the encoder and its hashes), so a shard either engine
writes is the same two files and a later run of either engine finds it. Within a shard, the
encoder batches are the ones `embed_verified` forms (`encoder.batch_size` consecutive hashes,
the refused ones left out), so the vectors are the same bits:

- decode: one task per encoder batch reads, re-hashes and decodes its images on a CPU
  (`embed_store._Verified`, the one-process item, refusals included);
- encode: an actor pool, one encoder per actor (one per GPU when the cluster has GPUs and
  `encoder.device` is not cpu, else one per CPU, decoding in the same process), writes each
  batch's vectors to `cache_dir/ray/embed/<shard>-b<batch size>/<batch>.npz`, atomically;
- finish: one task per shard joins its batch files into the shard's two files (`save_shard`).

A rerun skips every finished shard and every batch file already written. Ray is imported only
inside functions.
"""
from __future__ import annotations

import json
import shutil

import numpy as np

from rsprune.cache import atomic_path
from rsprune.embed_store import _Verified, save_shard, shard_done
from rsprune.layout import CACHE_RAY, cache_path


def _batch_file(folder, b: int):
    return folder / f"{b:05d}.npz"


class _Decode:
    """(shard j, batch b) -> its decoded images, the hashes they hold and the refused paths."""

    def __init__(self, shards, resolution: int, batch_size: int):
        self.shards, self.resolution, self.batch_size = shards, resolution, batch_size

    def __call__(self, batch: dict) -> dict:
        import ray

        xs, got, refused = [], [], []
        for j, b in zip(batch["j"], batch["b"]):
            hashes, cands = ray.get(self.shards[int(j)])[1:]
            lo, hi = int(b) * self.batch_size, (int(b) + 1) * self.batch_size
            items = _Verified(hashes[lo:hi], cands[lo:hi], self.resolution)
            ok, bad = [], []
            for i in range(len(items)):
                _, x, r = items[i]
                bad += r
                if x is not None:
                    ok.append((hashes[lo + i], x.numpy()))
            xs.append(np.stack([x for _, x in ok]) if ok else np.zeros((0, self.resolution, self.resolution, 3), np.uint8))
            got.append(json.dumps([h for h, _ in ok]))
            refused.append(json.dumps(bad))
        return {"j": batch["j"], "b": batch["b"], "x": xs, "got": got, "refused": refused}


class _Encode:
    """An actor holding one encoder: decoded batches -> their batch files."""

    def __init__(self, enc_cfg, folders: dict, dtype: str):
        import torch

        from rsprune.encoders import build_encoder

        if enc_cfg.threads:
            torch.set_num_threads(int(enc_cfg.threads))
        self.encoder, self.folders, self.dtype = build_encoder(enc_cfg), folders, dtype

    def __call__(self, batch: dict) -> dict:
        for j, b, x, got, refused in zip(batch["j"], batch["b"], batch["x"], batch["got"], batch["refused"]):
            x = np.asarray(x, np.uint8)
            emb = self.encoder(x) if len(x) else np.zeros((0, self.encoder.dim), np.float32)
            bad = json.loads(refused)
            with atomic_path(_batch_file(self.folders[int(j)], int(b))) as tmp, open(tmp, "wb") as f:
                np.savez(f, emb=emb.astype(self.dtype), got=np.asarray(json.loads(got), dtype=str),
                         paths=np.asarray([p for p, _ in bad], dtype=str), why=np.asarray([w for _, w in bad], dtype=str))
        return {"j": batch["j"], "b": batch["b"]}


class _Finish:
    """Shard j -> its two store files from its batch files; returns the refused paths (JSON)."""

    def __init__(self, shards, folders: dict, batches: dict, store, dtype: str):
        self.shards, self.folders, self.batches, self.store, self.dtype = shards, folders, batches, store, dtype

    def __call__(self, batch: dict) -> dict:
        import ray

        out = []
        for j in batch["j"]:
            key, hashes, _ = ray.get(self.shards[int(j)])
            got, embs, refused = [], [], []
            for b in range(self.batches[int(j)]):
                with np.load(_batch_file(self.folders[int(j)], b), allow_pickle=False) as z:
                    got += z["got"].tolist()
                    embs.append(z["emb"])
                    refused += list(zip(z["paths"].tolist(), z["why"].tolist()))
            save_shard(self.store, key, hashes, got, np.concatenate(embs), self.dtype)
            shutil.rmtree(self.folders[int(j)], ignore_errors=True)
            out.append(json.dumps(refused))
        return {"j": batch["j"], "refused": out}


def actor_pool(enc_cfg) -> dict:
    """map_batches arguments of the encoder actors: one per GPU where there are GPUs and the
    encoder may use one, else one per CPU."""
    import ray
    from ray.data import ActorPoolStrategy

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus and str(enc_cfg.device) != "cpu":
        return dict(compute=ActorPoolStrategy(size=gpus), num_gpus=1)
    return dict(compute=ActorPoolStrategy(size=max(1, int(res.get("CPU", 1)))), num_cpus=1)


def ray_run_shards(plan, path_of: dict, enc_cfg, store, dtype: str, rank: int = 0, world: int = 1,
                   progress: bool = True, cache_dir: str = "") -> dict:
    """rsprune/embed_store.py:run_shards as Ray Data operations (all shards: the cluster is the
    one process); returns the {path: reason} refused, in shard and batch order."""
    import ray
    import ray.data

    todo = [(k, h) for k, h in plan if not shard_done(store, k, h)]
    if not todo:
        return {}
    bs = int(enc_cfg.batch_size)
    store.mkdir(parents=True, exist_ok=True)
    shards = [ray.put((k, list(h), [[path_of[x]] if isinstance(path_of[x], str) else list(path_of[x]) for x in h]))
              for k, h in todo]
    folders = {j: cache_path(cache_dir, CACHE_RAY, "embed", f"{k}-b{bs}") for j, (k, _) in enumerate(todo)}
    batches = {j: -(-len(h) // bs) for j, (_, h) in enumerate(todo)}
    left = [{"j": j, "b": b} for j in batches for b in range(batches[j]) if not _batch_file(folders[j], b).exists()]
    if left:
        resolution = int(enc_cfg.resolution)
        (ray.data.from_items(left)
         .map_batches(_Decode(shards, resolution, bs), batch_size=1, num_cpus=1)
         .map_batches(_Encode, batch_size=1, fn_constructor_args=(enc_cfg, folders, dtype), **actor_pool(enc_cfg))
         .take_all())
    rows = (ray.data.from_items([{"j": j} for j in batches])
            .map_batches(_Finish(shards, folders, batches, store, dtype), batch_size=1, num_cpus=1).take_all())
    refused = {}
    for r in sorted(rows, key=lambda r: int(r["j"])):
        refused.update(dict(json.loads(r["refused"])))
    return refused
