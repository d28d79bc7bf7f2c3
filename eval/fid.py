"""Fréchet distance (FID with feature=inception) and KID between two folder trees of images.

    python eval/fid.py real=DIR fake=DIR [feature=efficientnet_lite2|efficientnet_lite0|clip|dinov2|inception]
                       [inception_weights=PATH] [kid=true] [out=FILE.json]

Prints `kid=<value>` (where computed) and, as the last line, `fd=<value>`; with out=FILE also
writes them (and the counts) as JSON. The statistics and distances go through torchmetrics'
FrechetInceptionDistance / KernelInceptionDistance; the feature extractor (eval/features.py)
runs first so that the reference set's features are cached by content hash, and are handed to
torchmetrics through a pass-through feature module. Resize protocol: antialiased bicubic to the
extractor's input size (see eval/features.py). Unreadable images are counted and skipped; fewer
than 2 images is an error (exit 2); fewer than `warn_below` gives a warning that FD is biased
upward at small N (KID is unbiased, which is why it is reported beside FD). The KID subset size
shrinks to the smaller set when that set has fewer images than `kid_subset_size`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from rsprune.cache import write_json
from rsprune.cli import UsageError, main
from rsprune.imageio import list_images

from eval.features import (build_extractor, extract_features, metric_label, reference_stats, warn)
from eval.frechet import frechet_distance  # noqa: F401  (re-exported: the float64 NumPy/SciPy reference)


class PrecomputedFeatures(torch.nn.Module):
    """The 'feature network' handed to torchmetrics when features are already extracted (and cached)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def check_count(n: int, what: str, warn_below: int = 300) -> None:
    """FD needs a covariance: at least 2 images; under a few hundred the estimate is biased."""
    if n < 2:
        raise UsageError(f"{what}: {n} readable image(s); FD needs at least 2")
    if n < warn_below:
        warn(f"{what}: only {n} images; FD is biased upward at small N (compare FDs only at equal N, "
             f"or use KID)")


def fd_kid(real_feats: np.ndarray, fake_feats: np.ndarray, kid: bool = False, kid_subsets: int = 100,
           kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FD (and KID mean/std) between two feature matrices, computed by torchmetrics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = real_feats.shape[1]
    real, fake = torch.as_tensor(real_feats, dtype=torch.float64), torch.as_tensor(fake_feats, dtype=torch.float64)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(d))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    out = {"fd": max(float(metric.compute()), 0.0),  # rounding leaves -1e-4 for identical sets
            "kid": None, "kid_std": None, "kid_subset_size": None}
    if kid:
        from torchmetrics.image.kid import KernelInceptionDistance

        size = int(min(kid_subset_size, len(real), len(fake)))
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # bounded by N here
        k = KernelInceptionDistance(feature=PrecomputedFeatures(d), subsets=int(kid_subsets), subset_size=size)
        k.update(real, real=True)
        k.update(fake, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from the global RNG: fix them
            torch.manual_seed(seed)
            mean, std = k.compute()
        out |= {"kid": float(mean), "kid_std": float(std), "kid_subset_size": size}
    return out


def frechet_distance_from_images(real, fake, feature="efficientnet_lite2", kid=False, batch_size: int = 64,
                                 inception_weights: str | None = None, overrides: dict | None = None,
                                 **kid_opts) -> dict:
    """FD (and KID) between two uint8 NHWC arrays (or lists of HxWx3 arrays, or image paths).

    Returns dict(fd, kid, kid_std, kid_subset_size, n_real, n_fake, feature, metric)."""
    extractor = build_extractor(feature, inception_weights=inception_weights, overrides=overrides)
    rf, _ = extract_features(real, extractor, batch_size)
    ff, _ = extract_features(fake, extractor, batch_size)
    check_count(len(rf), "real", 0)
    check_count(len(ff), "fake", 0)
    name = extractor.name
    return fd_kid(rf, ff, kid=kid, **kid_opts) | {"n_real": len(rf), "n_fake": len(ff), "feature": name,
                                                  "metric": metric_label(name)}


def image_paths(root, what: str) -> list[str]:
    if root is None or str(root) in ("", "None"):
        raise UsageError(f"{what}=DIR is required")
    root = Path(str(root))
    if not root.is_dir():
        raise UsageError(f"{what}={root}: not a folder")
    return [str(root / p) for p in list_images(root)]


def encoder_overrides(cfg) -> dict:
    """`encoder_overrides` plus the `resolution` shortcut, as a plain dict."""
    from omegaconf import OmegaConf

    ov = OmegaConf.to_container(cfg.get("encoder_overrides") or OmegaConf.create({}), resolve=True)
    if cfg.get("resolution"):
        ov["resolution"] = int(cfg.resolution)
    return ov


def run(cfg: DictConfig) -> dict:
    """Score `cfg.fake` against `cfg.real` (whose statistics are cached)."""
    real, fake = image_paths(cfg.real, "real"), image_paths(cfg.fake, "fake")
    extractor = build_extractor(cfg.feature, inception_weights=cfg.get("inception_weights"),
                                overrides=encoder_overrides(cfg), device=cfg.get("device"))
    ref = reference_stats(real, extractor, cfg.cache_dir, root=cfg.real, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers)
    ff, fake_bad = extract_features(fake, extractor, cfg.batch_size, cfg.num_workers)
    for what, n, bad in (("real", ref["n"], ref["n_unreadable"]), ("fake", len(ff), fake_bad)):
        if bad:
            warn(f"{what}: {bad} unreadable image(s) skipped")
        check_count(n, f"{what}={cfg[what]}", cfg.warn_below)
    res = fd_kid(ref["features"], ff, kid=cfg.kid, kid_subsets=cfg.kid_subsets,
                 kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    res |= {"metric": metric_label(extractor.name), "feature": extractor.name, "n_real": ref["n"],
            "n_fake": len(ff), "unreadable_real": ref["n_unreadable"], "unreadable_fake": fake_bad,
            "real": str(cfg.real), "fake": str(cfg.fake), "real_stats_cached": ref["cached"]}
    print(f"{res['metric']}: real {res['n_real']} images, fake {res['n_fake']} images")
    if res["kid"] is not None:
        print(f"kid={res['kid']:.6g}")
    print(f"fd={res['fd']:.6g}")
    if cfg.get("out"):
        write_json(cfg.out, res)
    return res


if __name__ == "__main__":
    main("eval/fid", run, __doc__)
