"""Memorisation rate: how many generated samples sit closer to a training image than real unseen
images do.

    rate = mean over samples of [ d(sample, nearest training image) < q ]
    q    = the `percentile`-th percentile (default 5th) of d(test image, nearest training image)

Distances are Euclidean in the evaluation feature space (the FD features), nearest neighbours
by faiss (rsprune.knn, exact flat index). Test images are never trained on, so about
`percentile`% of them fall under q by construction: a rate near that share means samples are
no closer to the training set than fresh real images; a rate far above it means copying (a
small subset seen many times can win FD that way).
"""
from __future__ import annotations

import numpy as np

from rsprune.knn import search


def nn_distance(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Euclidean distance of each query row to its nearest `base` row."""
    d2, _ = search(np.asarray(base, np.float32), np.asarray(queries, np.float32), 1, metric="l2")
    return np.sqrt(np.clip(d2[:, 0], 0.0, None))


def threshold(train_feats: np.ndarray, test_feats: np.ndarray, percentile: float = 5.0) -> float:
    """q: the `percentile`-th percentile of test-to-train nearest-neighbour distances."""
    return float(np.percentile(nn_distance(train_feats, test_feats), percentile))


def memorisation_rate(train_feats: np.ndarray, sample_feats: np.ndarray, q: float) -> float:
    """Share of samples nearer than q to some training image."""
    return float((nn_distance(train_feats, sample_feats) < q).mean())
