"""Training data: the subset's image paths, the test split's held-out images, and cached latents.

Held-out images come from the test split (data.test) and the latent scale from the corpus
(data.corpus), both by a fixed seed: every run of a comparison shares them.

Latents are computed once per (subset, first stage, resolution) and stored as a float16 .npy
under `cache_dir/latents/<key>/`, read memory-mapped so that a large subset does not have to fit
in memory. Undecodable images are skipped and counted; the kept paths are stored beside them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from rsprune.cache import read_json, save_npy, stable_hash, verified, write_json
from rsprune.layout import CACHE_LATENTS, cache_path
from rsprune.cli import UsageError
from rsprune.imageio import UnreadableImage, load_rgb, resize
from rsprune.manifest import kept_file, read_kept
from rsprune.split import paths as split_paths

log = logging.getLogger(__name__)


# Every run of a comparison draws its held-out images, probe latents and latent-scale sample with
# this seed, not the training seed: seeds 0, 1, 2 of an arm are scored on the very same images.
SAMPLE_SEED = 0


def corpus_paths(data_cfg) -> list[str]:
    """Absolute paths of every image named by data.corpus (folders or list files), sorted."""
    return split_paths(data_cfg.corpus)


def test_paths(data_cfg) -> list[str]:
    """The test split (`data.test`): the one set every held-out loss, PSNR and FD is scored against."""
    return split_paths(data_cfg.test)


def seeded_sample(paths: list[str], n: int, seed: int = SAMPLE_SEED) -> list[str]:
    """A fixed sample of at most n paths (all of them if fewer), sorted."""
    if n >= len(paths):
        return list(paths)
    idx = np.random.default_rng(seed).choice(len(paths), int(n), replace=False)
    return [paths[i] for i in sorted(idx)]


def resolve_subset(data_cfg, seed: int = SAMPLE_SEED) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths) for `data.subset` = kept.txt | prune run folder | full.

    Held-out images are a fixed sample of `data.holdout` test-split images (the same for every
    run and seed); a training set that shares an image with the test split is refused.
    """
    spec = str(data_cfg.subset)
    train = corpus_paths(data_cfg) if spec == "full" else read_subset(spec)
    test = test_paths(data_cfg)
    check_disjoint(train, test)
    return train, seeded_sample(test, int(data_cfg.holdout))


def check_disjoint(train: list[str], test: list[str]) -> None:
    """UsageError if a training image is also a test image (compared by real path: symlinks count)."""
    held = {os.path.realpath(p) for p in test}
    both = [p for p in train if os.path.realpath(p) in held]
    if both:
        raise UsageError(f"{len(both)} training images are in the test split (data.test), first: {both[0]}; "
                         "train on the split's corpus (data.corpus) or a subset pruned from it")


def read_subset(spec: str) -> list[str]:
    """Existing paths of a kept list (rsprune.manifest.read_kept); missing ones are counted and named."""
    path = kept_file(spec)
    if not path.is_file():
        raise UsageError(f"subset file {path} does not exist (data.subset=RUN_DIR/kept.txt | RUN_DIR | full)")
    paths = read_kept(path)
    if not paths:
        raise UsageError(f"subset file {path} is empty")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        log.warning("%d of %d paths in %s no longer exist and are skipped; first: %s",
                    len(missing), len(paths), path, ", ".join(missing[:3]))
    kept = [p for p in paths if os.path.isfile(p)]
    if not kept:
        raise UsageError(f"none of the {len(paths)} paths in {path} exists")
    return sorted(set(kept))


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, resized images; an unreadable file yields None (counted by the caller)."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, resize(load_rgb(self.paths[i]), self.size)
        except UnreadableImage as e:
            return i, str(e)


def _collate(items):
    return items


def iter_images(paths: list[str], size: int, batch_size: int, num_workers: int):
    """Yield (indices, uint8 NHWC batch, [(index, reason)] failures) over `paths`."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    for items in loader:
        ok = [(i, a) for i, a in items if not isinstance(a, str)]
        bad = [(i, a) for i, a in items if isinstance(a, str)]
        idx = [i for i, _ in ok]
        arr = np.stack([a for _, a in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
        yield idx, arr, bad


def load_images(paths: list[str], size: int, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
    """All readable images of `paths` as one uint8 NHWC array (for small sets: holdout, fitting)."""
    parts = [arr for _, arr, _ in iter_images(paths, size, batch_size, num_workers)]
    return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)


def latent_cache_dir(cache_dir, paths: list[str], fs_source: dict, kind: str, size: int) -> Path:
    key = stable_hash(paths, kind, fs_source, size)
    return cache_path(cache_dir, CACHE_LATENTS, key)


def cached_latents(first_stage, paths: list[str], size: int, cache_dir, batch_size: int,
                   num_workers: int, show_progress: bool = True) -> tuple[np.ndarray, dict]:
    """(raw latents memmap (N, C, h, w) float16, meta) for the readable images of `paths`."""
    out = latent_cache_dir(cache_dir, paths, first_stage.source, first_stage.kind, size)
    if (out / "meta.json").is_file() and verified(out / "latents.npy"):  # damaged: warned, recomputed
        return np.load(out / "latents.npy", mmap_mode="r"), read_json(out / "meta.json")
    from tqdm import tqdm

    lat, kept, bad = [], [], []
    if show_progress:  # the slow part of a first run: say so before it starts (the bar gives the ETA)
        print(f"[latents] encoding {len(paths)} images at {size} px with the {first_stage.kind} first stage, once: "
              f"cached under {out}", flush=True)
    bar = tqdm(total=len(paths), desc="encoding latents", disable=not show_progress, unit="img")
    for idx, arr, failures in iter_images(paths, size, batch_size, num_workers):
        if len(arr):
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
            lat.append(first_stage.encode_raw(x).cpu().to(torch.float16).numpy())
            kept += [paths[i] for i in idx]
        bad += [(paths[i], r) for i, r in failures]
        bar.update(len(idx) + len(failures))
    bar.close()
    if bad:
        log.warning("%d of %d images could not be decoded and are skipped; first: %s",
                    len(bad), len(paths), "; ".join(f"{p} ({r})" for p, r in bad[:3]))
    if not lat:
        raise UsageError(f"none of the {len(paths)} training images could be decoded")
    z = np.concatenate(lat)
    z32 = z.astype(np.float32)
    meta = {"n": int(len(z)), "unreadable": len(bad), "unreadable_first": [p for p, _ in bad[:10]],
            "shape": list(z.shape[1:]), "mean": float(z32.mean()), "std": float(z32.std()),
            "resolution": size, "first_stage": {"kind": first_stage.kind, "source": first_stage.source}}
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "latents.npy", z, checksum=True)
    (out / "paths.txt").write_text("\n".join(kept) + "\n")
    write_json(out / "meta.json", meta)  # written last: its presence marks the cache complete
    return np.load(out / "latents.npy", mmap_mode="r"), meta


def batch_indices(n: int, micro_step: int, batch_size: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Indices of process `rank`'s batch at global micro-step `micro_step`.

    The data order is a seeded permutation per epoch over a stream that every process shares,
    so it is a pure function of the step counter: a resumed run sees the batches it would
    have seen, with no loader state to save.
    """
    per_step = batch_size * world
    start = micro_step * per_step + rank * batch_size
    pos = np.arange(start, start + batch_size)
    epochs = pos // n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


def corpus_scale(first_stage, data_cfg, cache_dir, batch_size: int, num_workers: int,
                 show_progress: bool = True) -> dict:
    """{shift, scale, scale_from}: the latent normalisation of every run on this corpus.

    Mean and std of the raw latents of a fixed sample of `data.scale_images` corpus images, so
    that a 15% subset and the full set are trained (and their samples decoded) on one scale, not
    each on its own std.
    """
    corpus = corpus_paths(data_cfg)
    sample = seeded_sample(corpus, int(data_cfg.scale_images))
    _, meta = cached_latents(first_stage, sample, int(data_cfg.resolution), cache_dir, batch_size, num_workers,
                             show_progress)
    source = {"from": "corpus", "corpus_n": len(corpus), "n": meta["n"], "seed": SAMPLE_SEED,
              "corpus_key": stable_hash(corpus)}
    return {"shift": meta["mean"], "scale": 1.0 / max(meta["std"], 1e-6), "scale_from": source}


def probe_set(first_stage, paths: list[str], resolution: int, cache_dir, batch_size: int,
              num_workers: int) -> tuple[torch.Tensor, np.ndarray]:
    """(scaled latents, uint8 images) of test images for train.probes (the images give the data's saturation)."""
    raw, meta = cached_latents(first_stage, paths, resolution, cache_dir, batch_size, num_workers)
    images = load_images(paths, resolution, batch_size, num_workers)
    if len(images) != meta["n"]:
        raise RuntimeError(f"probe set: {len(images)} images decoded but {meta['n']} latents cached")
    z = (torch.from_numpy(np.asarray(raw, np.float32)) - first_stage.shift) * first_stage.scale
    return z, images
