"""The pruning-quality table: every method x ratio x seed on one corpus, mean +- std over seeds.

Runs (or reuses, when a run folder already holds a summary of the same config) each selection
through `prune.run.run`, measures it with `eval.subset_quality`, and writes
`<sweep.out>.md` and `<sweep.out>.png` (each metric against ratio, one line per method).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from eval.subset_quality import evaluate_runs
from rsprune.cache import atomic_path, read_json, write_text
from rsprune.cli import compose

# (column, header, lower is better?)
METRICS = [("fd", "FD to corpus", True), ("coverage_mean", "coverage mean", True),
           ("coverage_p95", "coverage p95", True), ("near_dup_rate", "near-dup rate", True),
           ("entropy_local", "local entropy (bits)", False), ("classes_present", "classes present", False),
           ("kl_uniform", "KL to uniform", True), ("kl_corpus", "KL to corpus", True)]


def sweep_runs(sweep: DictConfig, progress: bool = True) -> list[str]:
    """Run or reuse each selection of the sweep; returns the run folders."""
    from prune.run import run as prune_run

    dirs = []
    for method in sweep.methods:
        for ratio in sweep.ratios:
            for seed in sweep.seeds:
                rd = Path(sweep.runs_root) / f"{method}-r{ratio}-s{seed}"
                cfg = compose("prune", [f"method={method}", f"ratio={ratio}", f"seed={seed}", f"run_dir={rd}",
                                        "report.enabled=false", *sweep.overrides])
                summary = rd / "summary.json"
                if not (summary.exists() and read_json(summary)["config"] == OmegaConf.to_container(cfg)):
                    print(f"[pruning] {method} ratio {ratio} seed {seed}", flush=True)
                    prune_run(cfg, progress=progress)
                dirs.append(str(rd))
    return dirs


def aggregate(results: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(results)
    cols = [m for m, _, _ in METRICS]
    g = df.groupby(["method", "ratio"])[cols]
    return g.mean().join(g.std(ddof=0), rsuffix="_std").join(g.size().rename("seeds")).reset_index()


def markdown(agg: pd.DataFrame, feature: str, corpus_n: int) -> str:
    lines = [f"# Training-free subset quality (corpus of {corpus_n} usable images)", "",
             f"Mean +- std over seeds. Evaluation space: {feature} unit-normalised embeddings (the selection "
             "used EfficientNet-Lite0). FD = Fréchet distance subset vs corpus; coverage = cosine distance from a "
             "corpus image to its nearest selected image; near-dup = selected images with another at cosine >= "
             "0.95; classes from folder labels, never read by a selection. Rebuilt by `python eval/tables.py pruning`.",
             ""]
    for ratio in sorted(agg.ratio.unique()):
        part = agg[agg.ratio == ratio]
        lines += [f"## ratio {ratio} (keep {1 - ratio:.0%})", "",
                  "| method | " + " | ".join(h + (" ↓" if low else " ↑") for _, h, low in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for _, r in part.sort_values("method").iterrows():
            cells = []
            for col, _, low in METRICS:
                best = part[col].min() if low else part[col].max()
                v = f"{r[col]:.4f} ± {r[col + '_std']:.4f}" if col != "classes_present" else \
                    f"{r[col]:.1f} ± {r[col + '_std']:.1f}"
                cells.append(f"**{v}**" if np.isclose(r[col], best) else v)
            lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(agg: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (col, head, low) in zip(axes.ravel(), METRICS):
        for method, part in agg.groupby("method"):
            part = part.sort_values("ratio")
            ax.errorbar(part.ratio, part[col], yerr=part[col + "_std"], marker="o", ms=3, capsize=2,
                        lw=2.2 if method == "rsprune" else 1.0, label=method)
        ax.set_title(head + (" (lower is better)" if low else " (higher is better)"), fontsize=9)
        ax.set_xlabel("pruning ratio")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def build(cfg: DictConfig | None = None, progress: bool = True) -> pd.DataFrame:
    """The `pruning` section of eval/tables.py."""
    cfg = cfg if cfg is not None else compose("eval/subset_quality")
    results = evaluate_runs(sweep_runs(cfg.sweep, progress), cfg, progress)
    agg = aggregate(results)
    out = Path(cfg.sweep.out)
    feature = results[0]["feature"]
    label = f"EfficientNet-{feature.capitalize()}" if feature.startswith("lite") else feature
    write_text(out.with_suffix(".md"), markdown(agg, label, _corpus_size(results)))
    figure(agg, out.with_suffix(".png"))
    return agg


def _corpus_size(results: list[dict]) -> int:
    s = read_json(Path(results[0]["run_dir"]) / "summary.json")
    return int(s["counts"]["usable"])
