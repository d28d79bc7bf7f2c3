"""Training-free quality of pruned subsets: `python eval/subset_quality.py runs=[RUN_DIR,...]`.

For run folders over the same corpus, measured in an encoder space that did NOT drive the
selection (default EfficientNet-Lite2; the selection uses Lite0), on unit-normalised embeddings
from the same content-addressed store as the pruning embeddings (`rsprune/embed_store.py`):
- fd: Fréchet distance between the subset and the usable corpus (readable, unique images);
- coverage_mean / coverage_p95: cosine distance from each corpus image to its nearest selected
  image (the k-center radius, mean and 95th percentile);
- near_dup_rate: share of selected images with another selected image at cosine >= `near_dup`;
- entropy_local: mean local entropy (bits) of the subset;
- from folder labels (`<root>/.../<class>/file`), read here and never by a selection:
  classes present, KL(subset || uniform over corpus classes), KL(subset || corpus histogram),
  and KL to uniform over the classes of each source in `balance_groups` (label prefix).
Each run gets `subset_quality.json` beside its manifest.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from rsprune.cache import read_json, stable_hash, write_json
from rsprune.cli import UsageError, main
from rsprune.embed_store import embed_stage, gather
from rsprune.frechet import frechet_distance, gaussian_stats, psd_sqrt
from rsprune.knn import search
from rsprune.manifest import read_manifest


def folder_labels(m: pd.DataFrame) -> np.ndarray:
    """Class of each row: corpus root name + the image's parent folder name."""
    return (m["root"] + "/" + m["relpath"].map(lambda p: os.path.basename(os.path.dirname(p)))).to_numpy()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats; terms with p = 0 vanish."""
    p, q = p / p.sum(), q / q.sum()
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def group_balance(histogram: dict, groups) -> dict:
    """KL to uniform over the classes of one source only: `groups` maps a name to a class-label
    prefix (e.g. nwpu: "nwpu12/", the classes the scene reference never labelled)."""
    out = {}
    for name, prefix in groups.items():
        counts = np.array([n for c, n in sorted(histogram.items()) if c.startswith(str(prefix))], np.float64)
        out[f"kl_uniform_{name}"] = kl(counts, np.ones(len(counts))) if counts.sum() > 0 else float("nan")
    return out


def corpus_stats(feats: np.ndarray) -> tuple:
    """(mu, sigma, sigma^(1/2)) of the corpus: computed once, compared with every subset."""
    mu, sigma = gaussian_stats(feats)
    return mu, sigma, psd_sqrt(sigma)


def quality(feats: np.ndarray, selected: np.ndarray, entropy: np.ndarray, labels: np.ndarray,
            near_dup: float, stats: tuple | None = None) -> dict:
    """Metrics of one subset (`selected` mask over the usable corpus rows `feats`)."""
    sub = feats[selected]
    mu, sigma, root = stats if stats is not None else corpus_stats(feats)
    cover, _ = search(sub, feats, 1)
    dist = 1.0 - cover[:, 0]
    pair, _ = search(sub, sub, 2)
    classes, corpus_counts = np.unique(labels, return_counts=True)
    sub_counts = np.array([(labels[selected] == c).sum() for c in classes], np.float64)
    return dict(
        n=int(selected.sum()),
        fd=frechet_distance(mu, sigma, *gaussian_stats(sub), sigma1_root=root),
        coverage_mean=float(dist.mean()),
        coverage_p95=float(np.percentile(dist, 95)),
        near_dup_rate=float((pair[:, 1] >= near_dup).mean()) if len(sub) > 1 else 0.0,
        entropy_local=float(np.nanmean(entropy[selected])),
        classes_present=int((sub_counts > 0).sum()),
        classes_total=int(len(classes)),
        kl_uniform=kl(sub_counts, np.ones(len(classes))),
        kl_corpus=kl(sub_counts, corpus_counts.astype(np.float64)),
        class_histogram={str(c): int(n) for c, n in zip(classes, sub_counts)},
    )


def corpus_features(m: pd.DataFrame, cfg: DictConfig, progress: bool = True) -> np.ndarray:
    """Evaluation-space embeddings of the given manifest rows (all readable), via the store."""
    items = dict(zip(m.content_hash, m.path))
    plan, store, _, refused = embed_stage(items, cfg, str(cfg.cache_dir), progress)
    if refused:
        first, why = next(iter(refused.items()))
        raise UsageError(f"{len(refused)} corpus files changed since they were pruned, first: {first} ({why}); "
                         "prune again")
    return gather(plan, store, m.content_hash.tolist())


def evaluate_runs(run_dirs: list[str], cfg: DictConfig, progress: bool = True) -> list[dict]:
    """Quality of every run (cached in its folder under a key of manifest + metric config)."""
    results, feats, corpus_key, stats = [], None, None, None
    for rd in run_dirs:
        m = read_manifest(rd)
        usable = m[m.readable & (m.reason != "pruned_exact_duplicate")].reset_index(drop=True)
        key = stable_hash("quality", usable.id.tolist(), usable.selected.tolist(), dict(cfg.encoder),
                          float(cfg.near_dup), dict(cfg.get("balance_groups") or {}))
        out = Path(rd) / "subset_quality.json"
        if out.exists() and read_json(out).get("key") == key:
            results.append(read_json(out))
            continue
        this_corpus = stable_hash(usable.id.tolist())
        if corpus_key is not None and this_corpus != corpus_key:
            raise UsageError(f"{rd} was pruned from another corpus than {run_dirs[0]}; compare runs of one corpus")
        if feats is None:
            feats, corpus_key = corpus_features(usable, cfg, progress), this_corpus
            stats = corpus_stats(feats)
        r = quality(feats, usable.selected.to_numpy(), usable.entropy_local.to_numpy(), folder_labels(usable),
                    float(cfg.near_dup), stats)
        s = read_json(Path(rd) / "summary.json")
        r.update(group_balance(r["class_histogram"], cfg.get("balance_groups") or {}))
        method = s["config"]["method"]
        r.update(key=key, run_dir=str(rd), method=method.get("label", method["name"]), ratio=s["config"]["ratio"],
                 seed=s["config"]["seed"], feature=str(cfg.encoder.variant if "variant" in cfg.encoder else cfg.encoder.model))
        write_json(out, r)
        results.append(r)
    return results


def run(cfg: DictConfig) -> dict:
    runs = list(cfg.runs or [])
    missing = [r for r in runs if not (Path(r) / "manifest.parquet").exists()]
    if not runs or missing:
        raise UsageError(f"give runs=[RUN_DIR,...] of finished prune runs; missing manifest in: {missing or 'none given'}")
    res = evaluate_runs(runs, cfg)
    for r in res:
        print(f"{r['method']:>18} ratio {r['ratio']} seed {r['seed']}: fd={r['fd']:.4f} "
              f"coverage={r['coverage_mean']:.4f}/{r['coverage_p95']:.4f} near_dup={r['near_dup_rate']:.3f} "
              f"classes={r['classes_present']}/{r['classes_total']} kl_uniform={r['kl_uniform']:.3f}")
    return {"runs": res}


if __name__ == "__main__":
    main("eval/subset_quality", run, __doc__)
