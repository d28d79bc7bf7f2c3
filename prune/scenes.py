"""Stage 3: scene assignment against a labelled reference benchmark.

Each reference class gets prototypes (its mean embedding, or k-means prototypes inside the
class); a corpus image goes to the scene of its most similar prototype (cosine). Alternative
(`assign=knn`): a vote of the k most similar reference images.

An image whose best similarity is under the threshold matches no scene. The threshold is
calibrated to the data (`scenes.threshold`): `reference` takes the `scenes.quantile` of the
reference's own held-out best similarities (half of each class scored against prototypes of
the other half: how similar a true member of a scene typically is, in this encoder);
`corpus` takes that quantile of the corpus's best similarities (a fixed share unmatched);
a number is an absolute cosine (the old behaviour; -1 disables). A corpus from another
source or sensor sits lower on the absolute scale, and an absolute cosine then puts most of it
in one stratum. Unmatched images are clustered into pseudo-scenes (`pseudo_scenes`), so a
whole unmatched source is never one quota; with pseudo-scenes off they form scene -1.
`assign=folder` skips all of this: a labelled corpus's own class folders are the strata.

`scene_stage` is the cached wrapper the pipeline calls: its table (content hash -> stratum,
similarity) is keyed by the embedding store, the reference index, the corpus hashes, the
`scenes` config and the seed; its diagnostics are stored beside it.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from prune import state
from prune.state import LOCAL, materialize, partitions
from rsprune.cache import cached_table, read_json, rows_digest, stable_hash, write_json
from rsprune.errors import UsageError, warn
from rsprune.knn import kmeans, normalize, search
from rsprune.layout import CACHE_SCENES, cache_path

UNMATCHED = -1
CHUNK = 65536  # corpus rows per assignment chunk
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)  # the similarity distribution reported in diagnostics


def reference_labels(relpaths: list[str], what: str = "reference") -> tuple[np.ndarray, list[str]]:
    """Class index per reference (or, `what="corpus"`, corpus) file (`<root>/<class>/...`) and
    the sorted class names."""
    names = [p.split(os.sep)[0] if os.sep in p else "" for p in relpaths]
    if any(n == "" for n in names):
        hint = "" if what == "reference" else " for scenes.assign=folder"
        raise UsageError(f"{what} images must sit in class folders{hint}: <{what}>/<class>/*.jpg")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise UsageError(f"the {what} needs at least 2 class folders, found {len(classes)}")
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


def folder_scenes(relpaths: list[str]) -> tuple[np.ndarray, list[str], dict]:
    """`scenes.assign=folder`: the corpus's own class folders are the strata (a labelled corpus;
    on the imbalanced corpora, the bound scene strata can reach). No reference is read."""
    strata, classes = reference_labels(relpaths, "corpus")
    info = diagnostics(strata, np.zeros(0, np.float32), np.nan, "corpus class folders (scenes.assign=folder)",
                       len(classes), 0, "none")  # no similarity: nothing was matched against a threshold
    return strata, classes, info | {"threshold": None}


def check_scenes(cfg) -> None:
    """The scene keys this stage adds, checked before anything runs (one-line UsageError)."""
    t = cfg.threshold
    if not (t in ("reference", "corpus") or (isinstance(t, (int, float)) and not isinstance(t, bool))):
        raise UsageError(f"scenes.threshold must be reference, corpus or a cosine, got {t!r}")
    if not isinstance(t, str) and not -1.0 <= t <= 1.0:
        raise UsageError(f"scenes.threshold as a cosine must be in [-1, 1] (-1: off), got {t!r}")
    q = cfg.quantile
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise UsageError(f"scenes.quantile must be a number in [0, 1], got {q!r}")
    p = cfg.pseudo_size
    if not (p in ("auto", None) or (isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0)):
        raise UsageError(f"scenes.pseudo_size must be auto, 0/null or a positive number, got {p!r}")


def heldout_scores(ref: np.ndarray, labels: np.ndarray, mode: str, per_class: int, knn: int, seed: int) -> np.ndarray:
    """Best similarity of held-out reference images: a seeded half of each class is scored
    against prototypes (or neighbours) built from the other half, exactly as corpus images are."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(ref), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held[rng.permutation(rows)[: len(rows) // 2]] = True
    if held.all() or not held.any():
        raise UsageError("the reference needs at least 2 images per class to calibrate scenes.threshold")
    _, score = assign_scenes(ref[held], ref[~held], labels[~held], mode, per_class, knn, -np.inf, seed)
    return score


def calibrate(setting, quantile: float, corpus_score: np.ndarray, heldout) -> tuple[float, str]:
    """(threshold, rule) from `scenes.threshold`: a number, `reference` or `corpus`.
    `heldout` is a callable giving the reference's held-out scores (computed only when needed)."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting), "absolute"
    if not 0.0 <= float(quantile) <= 1.0:
        raise UsageError(f"scenes.quantile must lie in [0, 1], got {quantile!r}")
    if setting == "reference":
        return float(np.quantile(heldout(), quantile)), f"reference held-out best similarity, quantile {quantile}"
    if setting == "corpus":
        if not len(corpus_score):
            return -np.inf, "corpus (empty)"
        return float(np.quantile(corpus_score, quantile)), f"corpus best similarity, quantile {quantile}"
    raise UsageError(f"scenes.threshold must be a number, reference or corpus, got {setting!r}")


def n_pseudo(n_unmatched: int, n_total: int, n_classes: int, pseudo_size) -> int:
    """Pseudo-scenes for the unmatched pool. `auto`: as many as the reference scenes its share of
    the corpus would fill, round(n_unmatched / (n_total / n_classes)); a number: images per
    pseudo-scene; 0 or null: none (one unmatched stratum)."""
    if n_unmatched == 0 or pseudo_size in (None, 0):
        return 0
    per = n_total / max(n_classes, 1) if pseudo_size == "auto" else float(pseudo_size)
    if per <= 0:
        raise UsageError(f"scenes.pseudo_size must be auto, 0/null or a positive number, got {pseudo_size!r}")
    return int(max(1, min(round(n_unmatched / per), n_unmatched)))


PSEUDO_SAMPLE = 1 << 17  # the pseudo-scene k-means fits on at most max(this, PSEUDO_PER_SCENE * k) unmatched rows
PSEUDO_PER_SCENE = 256


def pseudo_scenes(emb: np.ndarray, k: int, seed: int, engine=LOCAL, tag: str = "pseudo") -> np.ndarray:
    """Pseudo-scene index (0..k-1) of each unmatched image: spherical k-means on the unmatched
    pool (on a seeded sample of PSEUDO_SAMPLE rows when it is larger), then each row to its
    nearest centroid, partition by partition. `emb` is an array or an engine's lazy rows; the
    fit and each partition's assignment are tasks of `engine`."""
    if k <= 1:
        return np.zeros(len(emb), np.int64)
    n = len(emb)
    m = min(n, max(PSEUDO_SAMPLE, PSEUDO_PER_SCENE * k))
    sample = emb if m == n else emb[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
    fit = functools.partial(_fit_task, k=k, seed=seed)
    centroids = next(iter(engine.map(fit, [sample], f"{tag}-fit")))
    near = functools.partial(_nearest_task, centroids=centroids)
    return np.concatenate(list(engine.map(near, (emb[p] for p in partitions(n)), f"{tag}-assign")))


def _fit_task(rows, k: int, seed: int) -> np.ndarray:
    return kmeans(materialize(rows), k, seed=seed, spherical=True)[0]


def _nearest_task(rows, centroids: np.ndarray) -> np.ndarray:
    return search(centroids, materialize(rows), 1)[1][:, 0].astype(np.int64)


def stratify(scene: np.ndarray, score: np.ndarray, emb_rows, n_classes: int, threshold: float,
             pseudo_size, seed: int, engine=LOCAL, tag: str = "pseudo") -> tuple[np.ndarray, int]:
    """Strata from the best scene and its similarity: matched images keep their scene; the
    unmatched become pseudo-scenes n_classes..n_classes+k-1 (or UNMATCHED when k = 0).
    `emb_rows(rows)` gives the embeddings of the unmatched rows (or an engine's lazy rows: the
    pseudo-scene fit and assignment are tasks of `engine`). Returns (strata, k)."""
    out = scene.astype(np.int64).copy()
    rows = np.flatnonzero(score < threshold)
    k = n_pseudo(len(rows), len(scene), n_classes, pseudo_size)
    if k == 0:
        out[rows] = UNMATCHED
    else:
        out[rows] = n_classes + pseudo_scenes(emb_rows(rows), k, seed, engine, tag)
    return out, k


def diagnostics(strata: np.ndarray, score: np.ndarray, threshold: float, rule: str, n_classes: int,
                k_pseudo: int, pseudo_size, heldout: np.ndarray | None = None) -> dict:
    """What summary.json and the report say about the strata: matched share, the similarity
    distribution against the threshold, pseudo-scene sizes."""
    matched = (strata >= 0) & (strata < n_classes)
    q = lambda v: {f"p{int(100 * x)}": float(np.quantile(v, x)) for x in QUANTILES} if len(v) else {}
    sizes = np.bincount(strata[strata >= n_classes] - n_classes, minlength=k_pseudo) if k_pseudo else []
    out = dict(threshold=float(threshold), rule=rule, images=int(len(strata)), matched=int(matched.sum()),
               matched_share=float(matched.mean()) if len(strata) else 0.0, similarity=q(score),
               matched_scenes=int(len(np.unique(strata[matched]))),
               pseudo_scenes=int(k_pseudo), pseudo_size_rule=str(pseudo_size),
               pseudo_scene_sizes=[int(v) for v in sizes], unmatched_stratum=int((strata == UNMATCHED).sum()))
    if heldout is not None:
        out["reference_heldout_similarity"] = q(heldout)
    return out


def pseudo_name(j: int) -> str:
    return f"pseudo_{j:02d}"


def scene_names(classes: list[str], k_pseudo: int) -> dict[int, str]:
    """Stratum index -> name: reference classes, pseudo-scenes after them, -1 unmatched, -2 none."""
    names = {i: c for i, c in enumerate(classes)} | {UNMATCHED: "unmatched", UNMATCHED - 1: ""}
    return names | {len(classes) + j: pseudo_name(j) for j in range(k_pseudo)}


def _chunk_task(rows, emb_ref, labels, mode: str, per_class: int, knn: int, seed: int):
    """Best scene and similarity of one chunk of rows (an engine's lazy rows; no threshold yet)."""
    return assign_scenes(materialize(rows), emb_ref, labels, mode, per_class, knn, -np.inf, seed)


def scene_stage(store, hashes: list[str], ref: pd.DataFrame, ref_key: str, scenes_cfg, seed: int,
                cache_dir: str, engine=LOCAL) -> tuple[pd.DataFrame, list[str], dict, bool]:
    """(table content_hash -> scene (stratum), scene_similarity; class names; diagnostics; was
    cached) for the sorted corpus content `hashes`, against the readable images of the reference
    index `ref`. `store` is the embedding store (rsprune/embed_store.py:Store).

    The best scene is found in chunks of CHUNK rows (a second full N x d copy would break the
    memory bound at 1e6); the threshold is calibrated on the whole set, then the unmatched rows
    are gathered once for the pseudo-scenes. The diagnostics are stored beside the table
    (`<key>.json`) so a cached run reports them too. `engine` runs the chunks and the
    pseudo-scene fit as its tasks (prune/state.py; engine=ray keeps its own table)."""
    ok = ref[ref.readable]
    labels, classes = reference_labels(ok.relpath.tolist())  # names and labels from the same files
    empty = sorted(set(reference_labels(ref.relpath.tolist())[1]) - set(classes))
    if empty:
        warn(f"reference class{'es' if len(empty) > 1 else ''} {', '.join(empty)} "
             "with no readable image dropped from the scenes")
    c = scenes_cfg
    cut = {"part": state.PART, "pseudo_sample": [PSEUDO_SAMPLE, PSEUDO_PER_SCENE]}  # they change the bits at scale
    key = stable_hash("scenes", store.key, ref_key, rows_digest(hashes), OmegaConf.to_container(c), seed, cut,
                      *(() if engine is LOCAL else (engine.name,)))
    path = cache_path(cache_dir, CACHE_SCENES, f"{key}.parquet")
    info_path = path.with_suffix(".json")
    if path.exists() and (not info_path.is_file() or read_json(info_path).get("key") != key):
        path.unlink()  # a table without its diagnostics (an older cache): compute both again
    mode, per_class, knn = str(c.assign), int(c.per_class), int(c.knn)
    box = {}

    def compute():
        emb_ref = store.gather(ok.content_hash.tolist())
        task = functools.partial(_chunk_task, emb_ref=emb_ref, labels=labels, mode=mode, per_class=per_class,
                                 knn=knn, seed=seed)
        lazy = engine.lazy(store, hashes)  # the corpus rows, gathered (or sent) a chunk at a time
        chunks = (lazy[i:i + CHUNK] for i in range(0, len(hashes), CHUNK))
        parts = list(engine.map(task, chunks, f"scenes-{key}"))
        best, score = (np.concatenate(p) for p in zip(*parts)) if parts else (np.zeros(0, np.int64),) * 2
        held = heldout_scores(emb_ref, labels, mode, per_class, knn, seed)
        threshold, rule = calibrate(c.threshold, float(c.quantile), score, lambda: held)
        strata, k = stratify(best, score, lambda rows: lazy[rows], len(classes), threshold, c.pseudo_size, seed,
                             engine, f"pseudo-{key}")
        box["info"] = diagnostics(strata, score, threshold, rule, len(classes), k, c.pseudo_size, held)
        write_json(info_path, {"key": key, **box["info"]})  # before the table: a table implies its diagnostics
        return pd.DataFrame({"content_hash": hashes, "scene": strata, "scene_similarity": score})

    table, cached = cached_table(path, key, compute)
    info = box.get("info") or {k: v for k, v in read_json(info_path).items() if k != "key"}
    return table, classes, info, cached
