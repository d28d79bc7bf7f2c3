"""Stage 2: embed every readable, unique image of the corpus and the reference benchmark.

The vectors go to the content-addressed embedding store (rsprune/embed_store.py: shards keyed by
the encoder config and their content hashes, resumed at the first missing shard, files whose
bytes changed since the index refused). All readable images are embedded, not only stage-1
survivors, so the entropy cut stays free to change without a new embedding pass; images shared
by corpus and reference are embedded once. A refused file is returned in `Store.refused`, and
prune/run.py records it unreadable with the reason.

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

import torch

from prune.index import index_inputs
from prune.validate import precheck, validate
from rsprune.markers import mark_cache
from rsprune.embed_store import Store, embed_stage


def embed_inputs(inputs, cfg, cache_dir: str, progress: bool = True, state=None, engine=None) -> Store:
    """Stage 2 over the index tables (prune/index.py:Inputs): every readable unique corpus
    image, and the readable reference images; on `engine` ray, the shards as Ray tasks."""
    items = collect_items(inputs.corpus, inputs.reference)
    runner = None
    if getattr(engine, "name", "local") == "ray":
        from functools import partial

        from prune.engine_ray_embed import ray_run_shards

        runner = partial(ray_run_shards, cache_dir=cache_dir)
    plan, path, key, refused = embed_stage(items, cfg, cache_dir, progress, state, runner)
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
    mark_cache(cfg.cache_dir)  # no later walk takes its files for corpus images
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

    main("prune", run, __doc__, precheck)
