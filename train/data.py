"""Training data: the subset's image paths, a disjoint held-out set, and cached latents.

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

from rsprune.cache import read_json, save_npy, stable_hash, write_json
from rsprune.cli import UsageError
from rsprune.imageio import UnreadableImage, load_rgb, resize
from rsprune.split import paths as split_paths

log = logging.getLogger(__name__)


def corpus_paths(data_cfg) -> list[str]:
    """Absolute paths of every image named by data.corpus (folders or list files), sorted."""
    return split_paths(data_cfg.corpus)


def resolve_subset(data_cfg, seed: int) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths) for `data.subset` = kept.txt | prune run folder | full.

    Held-out images are a seeded sample of corpus images outside the training set (compared
    by real path, so symlinked corpora count too): the FD hook and PSNR never see a training image.
    """
    spec = str(data_cfg.subset)
    corpus = corpus_paths(data_cfg)
    n_hold = int(data_cfg.holdout)
    order = np.random.default_rng(seed).permutation(len(corpus))
    if spec == "full":
        hold_idx = set(order[:min(n_hold, len(corpus) // 2)].tolist())
        train = [p for i, p in enumerate(corpus) if i not in hold_idx]
        return train, [corpus[i] for i in sorted(hold_idx)]
    train = read_subset(spec)
    chosen = {os.path.realpath(p) for p in train}
    hold = []
    for i in order:  # realpath only for the candidates looked at, not the whole corpus
        if len(hold) == n_hold:
            break
        if os.path.realpath(corpus[i]) not in chosen:
            hold.append(corpus[i])
    return train, sorted(hold)


def read_subset(spec: str) -> list[str]:
    """Existing paths of a kept list; missing ones are counted and the first few named."""
    path = Path(spec)
    if path.is_dir():
        path = path / "kept.txt"
    if not path.is_file():
        raise UsageError(f"subset file {path} does not exist (data.subset=RUN_DIR/kept.txt | RUN_DIR | full)")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"subset file {path} is empty")
    # Relative lines are taken relative to the list's folder, so a moved run folder still works.
    paths = [ln if os.path.isabs(ln) else str((path.parent / ln).resolve()) for ln in lines]
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
    return Path(cache_dir) / "latents" / key


def cached_latents(first_stage, paths: list[str], size: int, cache_dir, batch_size: int,
                   num_workers: int, show_progress: bool = True) -> tuple[np.ndarray, dict]:
    """(raw latents memmap (N, C, h, w) float16, meta) for the readable images of `paths`."""
    out = latent_cache_dir(cache_dir, paths, first_stage.source, first_stage.kind, size)
    if (out / "meta.json").is_file():
        return np.load(out / "latents.npy", mmap_mode="r"), read_json(out / "meta.json")
    from tqdm import tqdm

    lat, kept, bad = [], [], []
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
    save_npy(out / "latents.npy", z)
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
