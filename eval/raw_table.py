"""The training-free table on the raw corpus (`python eval/tables.py raw`): what each method keeps
of a redundant, imbalanced, noisy corpus, scored against the hidden labels (rsprune/rawcorpus.py).

Per run (method x seed at one ratio), from its manifest and the corpus's labels.parquet (read
here, never by a selection):
- noise_share: share of the kept tiles that are injected noise; and per noise kind, kept / injected;
- s1_precision, s1_recall: of stage 1's drops against the noise labels (filtering methods only);
- hom_dropped: legitimate homogeneous tiles (desert, sea, beach, bare land, meadow; not noise)
  that stage 1 dropped;
- near_dup_rate (EfficientNet-Lite2 cosine >= 0.95 among the kept), sources (distinct source
  images behind the kept clean tiles), kl_uniform (kept clean tiles over the source classes);
- fd_test: Fréchet distance, Lite2 space, between the kept tiles and the clean test split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from eval.subset_quality import corpus_features, kl, quality
from rsprune import rawcorpus, sweeps
from rsprune.cache import read_json, stable_hash, write_json, write_text
from rsprune.cli import UsageError
from rsprune.frechet import frechet_distance, gaussian_stats
from rsprune.manifest import read_manifest
from rsprune.split import paths as entry_paths

METRICS = [("noise_share", "noise kept", True), ("s1_precision", "stage-1 precision", False),
           ("s1_recall", "stage-1 recall", False), ("hom_dropped", "homogeneous dropped", True),
           ("near_dup_rate", "near-dup rate", True), ("sources", "sources covered", False),
           ("kl_uniform", "KL to uniform (classes)", True), ("fd_test", "FD to test split", True)]


def label_metrics(d: pd.DataFrame, homogeneous: set) -> dict:
    """The label-based metrics of one run: `d` = manifest rows joined with the labels (usable rows)."""
    noise = d["kind"].isin(rawcorpus.NOISE_KINDS).to_numpy()
    sel = d["selected"].to_numpy()
    dropped = (d["reason"] == "pruned_low_entropy").to_numpy()
    clean = ~noise
    hom = clean & d["class"].isin(homogeneous).to_numpy()
    classes = sorted(d["class"].unique())
    kept_cls = d.loc[sel & clean, "class"].value_counts()
    counts = np.array([kept_cls.get(c, 0) for c in classes], np.float64)
    out = dict(noise_share=float(noise[sel].mean()), hom_dropped=int((hom & dropped).sum()),
               sources=int(d.loc[sel & clean, "source"].nunique()),
               kl_uniform=kl(counts, np.ones(len(classes))),
               s1_precision=float((noise & dropped).sum() / dropped.sum()) if dropped.any() else np.nan,
               s1_recall=float((noise & dropped).sum() / noise.sum()) if dropped.any() else np.nan)
    for k in rawcorpus.NOISE_KINDS:
        out[f"kept_{k}"] = int((sel & (d["kind"] == k).to_numpy()).sum())
        out[f"n_{k}"] = int((d["kind"] == k).sum())
    return out


def test_features(cfg: DictConfig, test_entry: str, progress: bool) -> np.ndarray:
    paths = entry_paths(test_entry)
    m = pd.DataFrame({"path": paths, "content_hash": [hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths]})
    return corpus_features(m, cfg, progress)


def evaluate(run_dirs: list[str], labels: pd.DataFrame, cfg: DictConfig, progress: bool = True) -> list[dict]:
    """Metrics of every run (cached as raw_quality.json in its folder, keyed by selection + config)."""
    homogeneous = set(cfg.raw.homogeneous)
    out, feats, test_stats = [], None, None
    for rd in run_dirs:
        m = read_manifest(rd)
        usable = m[m.readable & (m.reason != "pruned_exact_duplicate")].reset_index(drop=True)
        key = stable_hash("raw", usable.id.tolist(), usable.selected.tolist(), dict(cfg.encoder), sorted(homogeneous))
        path = Path(rd) / "raw_quality.json"
        if path.exists() and read_json(path).get("key") == key:
            out.append(read_json(path))
            continue
        d = usable.merge(labels.drop(columns=["sha256"]), on="path", how="left", validate="one_to_one")
        if d["kind"].isna().any():
            raise UsageError(f"{rd}: {int(d['kind'].isna().sum())} corpus files have no label; prune the raw corpus")
        if feats is None:
            feats = corpus_features(usable, cfg, progress)
            test_stats = gaussian_stats(test_features(cfg, str(cfg.test), progress))
        sel = usable.selected.to_numpy()
        q = quality(feats, sel, usable.entropy_local.to_numpy(), d["class"].to_numpy(), float(cfg.near_dup))
        s = read_json(Path(rd) / "summary.json")
        method = s["config"]["method"]
        r = dict(key=key, run_dir=str(rd), method=method.get("label", method["name"]), ratio=s["config"]["ratio"],
                 seed=s["config"]["seed"], n=int(sel.sum()), near_dup_rate=q["near_dup_rate"],
                 fd_test=frechet_distance(*test_stats, *gaussian_stats(feats[sel])), **label_metrics(d, homogeneous))
        write_json(path, r)
        out.append(r)
    return out


def aggregate(results: list[dict], by: str) -> pd.DataFrame:
    df = pd.DataFrame(results)
    cols = [c for c in df.columns if c.startswith(("kept_", "n_")) or c in dict((m, 1) for m, _, _ in METRICS)]
    g = df.groupby(by, sort=False)[cols]
    return g.mean().join(g.std(ddof=0), rsuffix="_std").join(g.size().rename("seeds")).reset_index()


def fmt(v, sd, col) -> str:
    if np.isnan(v):
        return "-"
    if col in ("hom_dropped", "sources"):
        return f"{v:.0f} ± {sd:.0f}"
    return f"{v:.3f} ± {sd:.3f}" if col != "fd_test" else f"{v:.2f} ± {sd:.2f}"


def table(agg: pd.DataFrame, key: str) -> list[str]:
    lines = ["| " + key + " | " + " | ".join(h + (" ↓" if low else " ↑") for _, h, low in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for _, r in agg.iterrows():
        cells = []
        for c, _, low in METRICS:
            v = fmt(r[c], r[c + "_std"], c)
            col = agg[c].dropna()
            best = (col.min() if low else col.max()) if len(col) else np.nan
            cells.append(f"**{v}**" if not np.isnan(r[c]) and np.isclose(r[c], best) else v)
        lines.append(f"| {r[key]} | " + " | ".join(cells) + " |")
    return lines


def kinds_table(agg: pd.DataFrame, key: str) -> list[str]:
    kinds = rawcorpus.NOISE_KINDS
    lines = ["| " + key + " | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for _, r in agg.iterrows():
        lines.append(f"| {r[key]} | " + " | ".join(f"{r['kept_' + k]:.1f} / {r['n_' + k]:.0f}" for k in kinds) + " |")
    return lines


def figure(agg: pd.DataFrame, path: Path) -> None:
    from rsprune.plots import pyplot, save_png

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(agg))
    bottom = np.zeros(len(agg))
    n_kept = agg["noise_share"] * 0 + 1
    for k in rawcorpus.NOISE_KINDS:
        share = agg[f"kept_{k}"] / agg[[f"kept_{j}" for j in rawcorpus.NOISE_KINDS]].sum(axis=1).replace(0, 1)
        part = agg["noise_share"] * share
        a.bar(x, part, bottom=bottom, label=k)
        bottom += part.to_numpy()
    a.set_xticks(x, agg["method"], rotation=35, ha="right", fontsize=8)
    a.set_title("share of the kept set that is injected noise (lower is better)", fontsize=9)
    a.legend(fontsize=7)
    b.bar(x, agg["kl_uniform"], yerr=agg["kl_uniform_std"] * n_kept, color="tab:gray")
    b.set_xticks(x, agg["method"], rotation=35, ha="right", fontsize=8)
    b.set_title("KL to uniform over the source classes (lower is more balanced)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def section(cfg: DictConfig, progress: bool = True) -> pd.DataFrame:
    """The methods and the rsprune variants on the raw corpus (their prune runs: `python prune/sweep.py
    raw`); write <out>.md and .png."""
    folder = Path(str(cfg.corpus_folder))
    if not (folder / "labels.parquet").is_file():
        raise UsageError(f"raw corpus labels not found in {folder}")
    labels = rawcorpus.labels(folder)
    done = sweeps.require(sweeps.raw(cfg), "raw")  # `python prune/sweep.py raw` runs them
    runs = [r.run_dir for r in done if r.label is None]
    variants = {r.run_dir: r.label for r in done if r.label is not None}
    res = evaluate(runs, labels, cfg, progress)
    vres = evaluate(list(variants), labels, cfg, progress)
    for r in vres:
        r["method"] = "rsprune: " + variants[r["run_dir"]]
    agg = aggregate(res, "method")
    vagg = aggregate(vres, "method")
    raw = read_json(folder / "raw.json")
    ratio = cfg.sweep.ratios[0]
    lines = [f"# Training-free subset quality on the raw corpus (ratio {ratio}, {raw['n_tiles']} tiles)", "",
             f"Corpus: `data=raw` (docs/raw-corpus.md): {raw['n_tiles']} tiles from {raw['n_sources']} source "
             f"images of the split's corpus; kinds {raw['kinds']}. Mean ± std over seeds {list(cfg.sweep.seeds)}. "
             "Labels (class, kind, source) are read here only. Noise kept = share of the kept set that is "
             "injected noise; stage-1 precision/recall of its drops against the noise labels (filtering methods); "
             "homogeneous dropped = clean desert/sea/beach/bare land/meadow tiles stage 1 removed; near-dup in "
             "EfficientNet-Lite2 cosine >= 0.95; sources = distinct source images of the kept clean tiles; KL over "
             "the kept clean tiles' source classes; FD (Lite2) to the clean test split. "
             "Rebuilt by `python eval/tables.py raw`.", "", "## Methods", ""]
    lines += table(agg, "method") + ["", "Noise kept per kind (kept / injected, mean over seeds):", ""]
    lines += kinds_table(agg, "method") + ["", f"## rsprune variants (every one tried; seeds {list(cfg.variant_seeds)})", ""]
    lines += table(vagg, "method") + [""] + kinds_table(vagg, "method") + [""]
    out = Path(str(cfg.out))
    write_text(out.with_suffix(".md"), "\n".join(lines))
    figure(agg, out.with_suffix(".png"))
    return agg


__all__ = ["section", "evaluate", "label_metrics"]
