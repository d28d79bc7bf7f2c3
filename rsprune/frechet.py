"""Gaussian statistics of feature sets and the Fréchet distance between them, in float64 NumPy/SciPy.

The float64 NumPy/SciPy functions are the reference the torchmetrics path (`fd_kid`, what every
reported FD/KID goes through: eval/fid.py, eval/convergence.py, train's FD hook, downstream) is
checked against, and what the training-free subset-quality table uses on precomputed embeddings:

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2). Unlike `scipy.linalg.sqrtm(S1 @ S2)`
this needs no complex arithmetic and stays stable when the covariances are singular, which they
are whenever there are fewer samples than feature dimensions (the usual case in tests). From
feature matrices with few samples, `frechet_distance_features` uses an exact sample-space form.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from scipy import linalg

from rsprune.errors import UsageError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an (N, d) feature matrix, in float64; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N, d) feature matrix with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """s^(1/2) of a symmetric PSD matrix (float64)."""
    w, v = linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def sqrt_trace_product(s1: np.ndarray, s2: np.ndarray, s1_root: np.ndarray | None = None) -> float:
    """tr((s1 s2)^(1/2)) for symmetric PSD s1, s2 (float64). Pass `s1_root` = psd_sqrt(s1) when
    s1 is compared with many s2 (a fixed reference set): it is the costly half."""
    root = psd_sqrt(s1) if s1_root is None else s1_root
    m = root @ s2 @ root
    ev = linalg.eigvalsh((m + m.T) / 2.0)  # symmetrise away rounding before the eigen-solve
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, sigma1_root=None) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 (`sigma1_root`: see
    sqrt_trace_product)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * sqrt_trace_product(s1, s2, sigma1_root))
    return max(fd, 0.0)  # a distance; rounding can leave -1e-12 for identical sets


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, d) feature matrices.

    With few samples against the dimension (n1 n2 min(n1, n2) < d^3) it works in sample space:
    with centred A (n1 x d), B (n2 x d), S1 S2 has the nonzero spectrum of (A B^T)(A B^T)^T / c,
    c = (n1 - 1)(n2 - 1), so tr((S1 S2)^(1/2)) = ||A B^T||_* / sqrt(c) (nuclear norm), which is
    exact and avoids two d x d eigen-solves.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    n1, n2, d = len(f1), len(f2), f1.shape[1]
    if n1 < 2 or n2 < 2 or f2.shape[1] != d:
        raise ValueError(f"need two (N, d) feature matrices with N >= 2, got {f1.shape} and {f2.shape}")
    if n1 * n2 * min(n1, n2) >= d ** 3:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    a, b = f1 - mu1, f2 - mu2
    c1, c2 = n1 - 1.0, n2 - 1.0
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    fd = float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2.0 * cross)
    return max(fd, 0.0)


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
        print(f"warning: {what}: only {n} images; FD is biased upward at small N (compare FDs only at "
              f"equal N, or use KID)", file=sys.stderr)


def kid_subset(requested: int, n_real: int, n_fake: int) -> int:
    """KID subset size: at most half the smaller set, so that the subsets differ from one another
    and the std over them is a real spread (subsets of the whole set all coincide: std 0)."""
    return int(max(1, min(int(requested), min(n_real, n_fake) // 2)))


def fd_kid(real_feats: np.ndarray, fake_feats: np.ndarray, kid: bool = False, kid_subsets: int = 100,
           kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FD (and KID mean/std over `kid_subsets` random subsets, see kid_subset) between two
    feature matrices, computed by torchmetrics in float64."""
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

        size = kid_subset(kid_subset_size, len(real), len(fake))
        if size < 2:
            raise UsageError(f"KID needs at least 4 images per set (subsets of half the smaller set); "
                             f"have {len(real)} real, {len(fake)} fake")
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # bounded by N here
        k = KernelInceptionDistance(feature=PrecomputedFeatures(d), subsets=int(kid_subsets), subset_size=size)
        k.update(real, real=True)
        k.update(fake, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from the global RNG: fix them
            torch.manual_seed(seed)
            mean, std = k.compute()
        out |= {"kid": float(mean), "kid_std": float(std), "kid_subset_size": size}
    return out
