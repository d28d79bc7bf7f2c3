"""Order-independent arithmetic, so that a result reduced over partitions (engine=ray) equals the
single-process one bit for bit.

- `sum_parts` / `merge_parts` / `parts_total`: an exact sum of float64 values, kept as integers
  per binary exponent, mergeable in any order, rounded once at the end.
- `order_stat`: the k-th smallest of positive float64 values from histograms of their bit
  patterns (order-preserving for positive floats), so it needs O(bins) memory, not O(N).
- `mix64`: a seeded 64-bit hash of integer keys (splitmix64), for samples that depend on the
  item and the seed only, not on the order rows arrive in.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(keys: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (key + seed * golden): uniform uint64 per key, a pure function of both."""
    with np.errstate(over="ignore"):
        z = np.asarray(keys, np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _M1 + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def hash_keys(content_hashes) -> np.ndarray:
    """uint64 of the first 16 hex digits of each sha1 (the content, not its position)."""
    return np.array([int(h[:16], 16) for h in content_hashes], np.uint64)


def sum_parts(values: np.ndarray, groups: np.ndarray | None = None, n_groups: int = 1) -> dict:
    """{(group, exponent): integer sum of mantissas}; sum over parts of m * 2**(e - 53) is the
    exact sum of the group's values (finite float64)."""
    v = np.asarray(values, np.float64)
    g = np.zeros(len(v), np.int64) if groups is None else np.asarray(groups, np.int64)
    mant, exp = np.frexp(v)
    m = (mant * 2.0 ** 53).astype(np.int64)  # exact: |mant| < 1 holds 53 bits
    hi, lo = m >> 26, m & ((1 << 26) - 1)  # 27 + 26 bits: int64 sums stay exact past 2**36 rows
    out: dict = {}
    if not len(v):
        return out
    cell = g * 4096 + (exp.astype(np.int64) + 2048)
    cells, inv = np.unique(cell, return_inverse=True)
    hs, ls = np.zeros(len(cells), np.int64), np.zeros(len(cells), np.int64)
    np.add.at(hs, inv, hi)
    np.add.at(ls, inv, lo)
    for c, h, l in zip(cells.tolist(), hs.tolist(), ls.tolist()):
        key = (c // 4096, c % 4096 - 2048)
        out[key] = out.get(key, 0) + (h << 26) + l
    return out


def merge_parts(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def parts_total(parts: dict, n_groups: int = 1, divide=None) -> np.ndarray:
    """Per group the exact sum (divided by divide[g] when given), rounded once to float64."""
    acc = [Fraction(0)] * n_groups
    for (g, e), m in parts.items():
        acc[g] += Fraction(m) * Fraction(2) ** (e - 53)
    if divide is not None:
        acc = [a / int(d) if d else Fraction(0) for a, d in zip(acc, divide)]
    return np.array([float(a) for a in acc], np.float64)


def exact_mean(values: np.ndarray) -> float:
    return float(parts_total(sum_parts(values), 1, [len(values)])[0]) if len(values) else float("nan")


LEVELS = ((52, 12), (32, 20), (12, 20), (0, 12))  # (shift, bits) of the 64-bit pattern, most significant first


def bit_histogram(values: np.ndarray, level: int, prefix: int) -> np.ndarray:
    """Counts of positive float64 `values` whose pattern bits above this level equal `prefix`,
    by the level's bits."""
    bits = np.asarray(values, np.float64).view(np.int64)
    shift, width = LEVELS[level]
    if level:
        top = LEVELS[level - 1][0]
        bits = bits[(bits >> top) == prefix]
    return np.bincount(((bits >> shift) & ((1 << width) - 1)).astype(np.int64), minlength=1 << width)


def order_stat(histogram, k: int) -> float:
    """The k-th smallest (0-based) positive value; `histogram(level, prefix)` returns the summed
    `bit_histogram` over all partitions."""
    prefix = 0
    for level, (_, width) in enumerate(LEVELS):
        counts = np.cumsum(histogram(level, prefix))
        b = int(np.searchsorted(counts, k, side="right"))
        k -= int(counts[b - 1]) if b else 0
        prefix = (prefix << width) | b
    return float(np.array([prefix], np.int64).view(np.float64)[0])


def median_of(histogram, n: int) -> float:
    """np.median's value (the mean of the two middle values when n is even) from histograms."""
    a = order_stat(histogram, (n - 1) // 2)
    return a if n % 2 else float(np.mean(np.array([a, order_stat(histogram, n // 2)])))
