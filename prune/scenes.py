"""Stage 3: scene assignment against a labelled reference benchmark.

Each reference class gets prototypes (its mean embedding, or k-means prototypes inside the
class); a corpus image goes to the scene of its most similar prototype (cosine). Images whose
best similarity is under `threshold` form the "unmatched" stratum (scene -1), clustered like
any other. Alternative (`assign=knn`): a vote of the k most similar reference images.

`scene_stage` is the cached wrapper the pipeline calls: its table (content hash -> scene,
similarity) is keyed by the embedding store, the reference index, the corpus hashes, the
`scenes` config and the seed.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rsprune.cache import cached_table, stable_hash
from rsprune.errors import UsageError, warn
from rsprune.knn import kmeans, normalize, search
from rsprune.layout import CACHE_SCENES, cache_path

UNMATCHED = -1
CHUNK = 65536  # corpus rows per assignment chunk


def reference_labels(relpaths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class index per reference file (`<root>/<class>/...`) and the sorted class names."""
    names = [p.split(os.sep)[0] if os.sep in p else "" for p in relpaths]
    if any(n == "" for n in names):
        raise UsageError("reference images must sit in class folders: <reference>/<class>/*.jpg")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise UsageError(f"the reference benchmark needs at least 2 class folders, found {len(classes)}")
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[n] for n in names], np.int64), classes


def prototypes(ref: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, d) unit prototypes and their class: the class mean, or k-means inside each class."""
    protos, owner = [], []
    for c in np.unique(labels):
        x = ref[labels == c]
        if per_class <= 1 or len(x) <= per_class:
            p = x.mean(axis=0, keepdims=True) if per_class <= 1 else x
        else:
            p = kmeans(x, per_class, seed=seed + int(c), spherical=True)[0]
        protos.append(normalize(p))
        owner.append(np.full(len(p), c))
    return np.concatenate(protos).astype(np.float32), np.concatenate(owner)


def assign_scenes(emb: np.ndarray, ref: np.ndarray, labels: np.ndarray, mode: str = "prototype",
                  per_class: int = 1, knn: int = 10, threshold: float = 0.0, seed: int = 0):
    """Scene index per corpus row (UNMATCHED under the threshold) and its similarity."""
    if mode == "prototype":
        protos, owner = prototypes(ref, labels, per_class, seed)
        sim, idx = search(protos, emb, 1)
        scene, score = owner[idx[:, 0]], sim[:, 0]
    elif mode == "knn":
        k = min(knn, len(ref))
        sim, idx = search(ref, emb, k)
        votes = np.zeros((len(emb), labels.max() + 1), np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(emb)), k), labels[idx].ravel()), sim.ravel())
        scene = votes.argmax(axis=1)  # ties go to the lower class index: deterministic
        score = np.where(labels[idx] == scene[:, None], sim, -np.inf).max(axis=1)
    else:
        raise UsageError(f"unknown scenes.assign {mode!r}; choose prototype or knn")
    scene = np.where(score >= threshold, scene, UNMATCHED)
    return scene.astype(np.int64), score.astype(np.float32)


def scene_stage(store, hashes: list[str], ref: pd.DataFrame, ref_key: str, scenes_cfg, seed: int,
                cache_dir: str) -> tuple[pd.DataFrame, list[str], bool]:
    """(table content_hash -> scene, scene_similarity; class names; was cached) for the sorted
    corpus content `hashes`, against the readable images of the reference index `ref`.
    `store` is the embedding store (prune/embed.py:Store)."""
    ok = ref[ref.readable]
    labels, classes = reference_labels(ok.relpath.tolist())  # names and labels from the same files
    empty = sorted(set(reference_labels(ref.relpath.tolist())[1]) - set(classes))
    if empty:
        warn(f"reference class{'es' if len(empty) > 1 else ''} {', '.join(empty)} "
             "with no readable image dropped from the scenes")
    c = scenes_cfg
    key = stable_hash("scenes", store.key, ref_key, hashes, OmegaConf.to_container(c), seed)

    def compute():
        # In chunks: a second full N x d copy of the corpus would break the memory bound at 1e6.
        emb_ref = store.gather(ok.content_hash.tolist())
        parts = [assign_scenes(store.gather(hashes[i:i + CHUNK]), emb_ref, labels, str(c.assign),
                               int(c.per_class), int(c.knn), float(c.threshold), seed)
                 for i in range(0, len(hashes), CHUNK)]
        s, sim = (np.concatenate(p) for p in zip(*parts))
        return pd.DataFrame({"content_hash": hashes, "scene": s, "scene_similarity": sim})

    table, cached = cached_table(cache_path(cache_dir, CACHE_SCENES, f"{key}.parquet"), key, compute)
    return table, classes, cached
