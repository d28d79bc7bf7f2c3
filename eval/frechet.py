"""Gaussian statistics of feature sets and the Fréchet distance between them, in float64 NumPy/SciPy.

This is the reference implementation the torchmetrics path (eval/fid.py) is checked against,
and the one the training-free subset-quality table uses on precomputed embeddings:

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2). Unlike `scipy.linalg.sqrtm(S1 @ S2)`
this needs no complex arithmetic and stays stable when the covariances are singular, which they
are whenever there are fewer samples than feature dimensions (the usual case in tests). From
feature matrices with few samples, `frechet_distance_features` uses an exact sample-space form.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg


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
