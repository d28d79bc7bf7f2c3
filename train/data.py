"""Training data: the subset's image paths, the test split's held-out images, and cached latents.

Held-out images come from the test split (data.test) and the latent scale from the corpus
(data.corpus), both by a fixed seed: every run of a comparison shares them.

Latents are computed once per (subset, first stage, resolution) and stored as a float16 .npy
under `cache_dir/latents/<key>/`, read memory-mapped so that a large subset does not have to fit
in memory. The key holds each file's content fingerprint (rsprune/fingerprint.py), so images
overwritten in place are encoded again, and each file's bytes are checked against it as they are
decoded. Undecodable images are skipped and counted; the kept paths are stored beside them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from rsprune.cache import read_json, save_npy, stable_hash, verified, write_json
from rsprune.fingerprint import digest, fingerprints
from rsprune.layout import CACHE_FINGERPRINTS, CACHE_LATENTS, cache_path
from rsprune.cli import UsageError
from rsprune.imageio import UnreadableImage, load_sized
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


def sample_size(value, key: str) -> int | None:
    """A config's sample size: a positive int, or None for null / `all` (every image)."""
    if value is None or str(value).lower() in ("all", "null", "none"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"{key}={value!r}: expected a positive number of images, or null / all")
    return n


def seeded_sample(paths: list[str], n: int | None, seed: int = SAMPLE_SEED) -> list[str]:
    """A fixed sample of at most n paths (all of them if fewer, or if n is None), sorted."""
    if n is None or n >= len(paths):
        return list(paths)
    idx = np.random.default_rng(seed).choice(len(paths), int(n), replace=False)
    return [paths[i] for i in sorted(idx)]


def resolve_subset(data_cfg, seed: int = SAMPLE_SEED, cache_dir=None) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths) for `data.subset` = kept.txt | prune run folder | full.

    Held-out images are a fixed sample of `data.holdout` test-split images (the same for every
    run and seed; null / all: every one); a training set that shares an image with the test split
    is refused.
    """
    spec = str(data_cfg.subset)
    train = corpus_paths(data_cfg) if spec == "full" else read_subset(spec)
    test = test_paths(data_cfg)
    check_disjoint(train, test, cache_dir)
    return train, seeded_sample(test, sample_size(data_cfg.holdout, "data.holdout"))


def memo_dir(cache_dir):
    """Where the fingerprint memo lives (None: no memo, every file is read)."""
    return cache_path(cache_dir, CACHE_FINGERPRINTS) if cache_dir is not None else None


def check_disjoint(train: list[str], test: list[str], cache_dir=None) -> None:
    """UsageError if a training image is also a test image: the same file (a symlink or a
    hardlink of it) or the same bytes (a copy)."""
    held = {os.path.realpath(p) for p in test}
    both = [(p, p) for p in train if os.path.realpath(p) in held]
    if not both:
        fp_test = fingerprints(test, memo_dir(cache_dir))
        by_content = {h: p for h, p in zip(fp_test, test) if h}
        fp_train = fingerprints(train, memo_dir(cache_dir))
        both = [(p, by_content[h]) for p, h in zip(train, fp_train) if h in by_content]
    if both:
        p, same = both[0]
        what = "" if p == same else f" (same bytes as {same})"
        raise UsageError(f"{len(both)} training images are in the test split (data.test), first: {p}{what}; "
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


CHANGED = "changed since its fingerprint was taken"  # the reason given for a file rewritten mid-read


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, resized images; an unreadable file yields its reason (counted by the caller).
    With `expected` fingerprints, a file whose bytes no longer match yields CHANGED."""

    def __init__(self, paths: list[str], size: int, expected: list[str] | None = None):
        self.paths, self.size, self.expected = paths, size, expected

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.expected is None:
                return i, load_sized(self.paths[i], self.size)
            with open(self.paths[i], "rb") as f:
                data = f.read()
            if digest(data) != self.expected[i]:
                return i, CHANGED
            return i, load_sized(self.paths[i], self.size, data)
        except OSError as e:
            return i, f"{type(e).__name__}: {e.strerror or e}"
        except UnreadableImage as e:
            return i, str(e)


def _collate(items):
    return items


def iter_images(paths: list[str], size: int, batch_size: int, num_workers: int, expected=None):
    """Yield (indices, uint8 NHWC batch, [(index, reason)] failures) over `paths`."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, size, expected), batch_size=batch_size,
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


def latent_cache_dir(cache_dir, paths: list[str], contents: list[str], fs_source: dict, kind: str,
                     size: int) -> Path:
    """The cache folder of these files with these contents ('' for an unreadable one)."""
    key = stable_hash(paths, contents, kind, fs_source, size)
    return cache_path(cache_dir, CACHE_LATENTS, key)


def cached_latents(first_stage, paths: list[str], size: int, cache_dir, batch_size: int,
                   num_workers: int, show_progress: bool = True) -> tuple[np.ndarray, dict]:
    """(raw latents memmap (N, C, h, w) float16, meta) for the readable images of `paths`."""
    contents = fingerprints(paths, memo_dir(cache_dir))
    out = latent_cache_dir(cache_dir, paths, contents, first_stage.source, first_stage.kind, size)
    if (out / "meta.json").is_file() and verified(out / "latents.npy"):  # damaged: warned, recomputed
        return np.load(out / "latents.npy", mmap_mode="r"), read_json(out / "meta.json")
    from tqdm import tqdm

    lat, kept, bad = [], [], []
    if show_progress:  # the slow part of a first run: say so before it starts (the bar gives the ETA)
        print(f"[latents] encoding {len(paths)} images at {size} px with the {first_stage.kind} first stage, once: "
              f"cached under {out}", flush=True)
    bar = tqdm(total=len(paths), desc="encoding latents", disable=not show_progress, unit="img")
    for idx, arr, failures in iter_images(paths, size, batch_size, num_workers, contents):
        if len(arr):
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
            lat.append(first_stage.encode_raw(x).cpu().to(torch.float16).numpy())
            kept += [paths[i] for i in idx]
        bad += [(paths[i], r) for i, r in failures]
        bar.update(len(idx) + len(failures))
    bar.close()
    changed = [p for p, r in bad if r == CHANGED]
    if changed:  # latents of other bytes than the key names would be trusted by the next run
        raise UsageError(f"{len(changed)} training images changed while their latents were computed, first: "
                         f"{changed[0]}; nothing was cached: run again once the files stay put")
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
              num_workers: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(scaled latents, uint8 images, their paths) of the readable test images among `paths`, in
    order, for train.probes (the images give the data's saturation; the paths name the rows)."""
    raw, meta = cached_latents(first_stage, paths, resolution, cache_dir, batch_size, num_workers)
    idx, parts = [], []
    for i, arr, _ in iter_images(paths, resolution, batch_size, num_workers):
        idx += i
        parts.append(arr)
    images = np.concatenate(parts) if parts else np.zeros((0, resolution, resolution, 3), np.uint8)
    if len(images) != meta["n"]:
        raise RuntimeError(f"probe set: {len(images)} images decoded but {meta['n']} latents cached")
    z = (torch.from_numpy(np.asarray(raw, np.float32)) - first_stage.shift) * first_stage.scale
    return z, images, [paths[i] for i in idx]
