"""The pruning-quality table: every method x ratio x seed on one corpus, mean +- std over seeds.

Reads the prune runs of the section's sweep (rsprune/sweeps.py names them; `python prune/sweep.py
pruning` runs them first), measures each with `eval.subset_quality`, and writes
`<sweep.out>.md` and `<sweep.out>.png` (each metric against ratio, one line per method).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from eval.subset_quality import evaluate_runs
from rsprune import sweeps
from rsprune.cache import read_json, write_text
from rsprune.cli import compose

# (column, header, lower is better?)
METRICS = [("fd", "FD to corpus", True), ("coverage_mean", "coverage mean", True),
           ("coverage_p95", "coverage p95", True), ("near_dup_rate", "near-dup rate", True),
           ("entropy_local", "local entropy (bits)", False), ("classes_present", "classes present", False),
           ("kl_uniform", "KL to uniform", True), ("kl_uniform_nwpu", "KL to uniform, NWPU classes", True),
           ("kl_corpus", "KL to corpus", True)]


def metrics_of(df: pd.DataFrame) -> list[tuple[str, str, bool]]:
    """The METRICS the results carry (per-source balance only where the config asked for it)."""
    return [m for m in METRICS if m[0] in df.columns and df[m[0]].notna().any()]


def aggregate(results: list[dict], by=("method", "ratio")) -> pd.DataFrame:
    df = pd.DataFrame(results)
    cols = [m for m, _, _ in metrics_of(df)]
    g = df.groupby(list(by))[cols]
    return g.mean().join(g.std(ddof=0), rsuffix="_std").join(g.size().rename("seeds")).reset_index()


def cell(r, col: str, best) -> str:
    v = f"{r[col]:.4f} ± {r[col + '_std']:.4f}" if col != "classes_present" else f"{r[col]:.1f} ± {r[col + '_std']:.1f}"
    return f"**{v}**" if np.isclose(r[col], best) else v


def rows(part: pd.DataFrame, key: str, metrics) -> list[str]:
    """Markdown rows of one block, the best value of each column in bold."""
    out = ["| " + key + " | " + " | ".join(h + (" ↓" if low else " ↑") for _, h, low in metrics) + " |",
           "|---|" + "---|" * len(metrics)]
    for _, r in part.iterrows():
        out.append(f"| {r[key]} | " + " | ".join(cell(r, c, part[c].min() if low else part[c].max())
                                                 for c, _, low in metrics) + " |")
    return out


def markdown(agg: pd.DataFrame, feature: str, corpus_n: int, title: str = "Training-free subset quality",
             note: str = "") -> str:
    metrics = metrics_of(agg)
    lines = [f"# {title} (corpus of {corpus_n} usable images)", "",
             f"Mean +- std over seeds. Evaluation space: {feature} unit-normalised embeddings (the selection "
             "used EfficientNet-Lite0). FD = Fréchet distance subset vs corpus; coverage = cosine distance from a "
             "corpus image to its nearest selected image; near-dup = selected images with another at cosine >= "
             "0.95; classes from folder labels, never read by a selection. " + note, ""]
    for ratio in sorted(agg.ratio.unique()):
        lines += [f"## ratio {ratio} (keep {1 - ratio:.0%})", ""]
        lines += rows(agg[agg.ratio == ratio].sort_values("method"), "method", metrics) + [""]
    return "\n".join(lines)


def figure(agg: pd.DataFrame, path: Path) -> None:
    from rsprune.plots import pyplot, save_png

    plt = pyplot()

    metrics = metrics_of(agg)
    fig, axes = plt.subplots(3, 3, figsize=(15, 10.5))
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    colours = plt.cm.tab20(np.linspace(0, 1, 20))  # more methods than the default 10-colour cycle
    for ax, (col, head, low) in zip(axes.ravel(), metrics):
        ax.set_prop_cycle(color=colours[::2].tolist() + colours[1::2].tolist())
        for method, part in agg.groupby("method"):
            part = part.sort_values("ratio")
            ax.errorbar(part.ratio, part[col], yerr=part[col + "_std"], marker="o", ms=3, capsize=2,
                        lw=2.2 if method == "rsprune" else 1.0, label=method)
        ax.set_title(head + (" (lower is better)" if low else " (higher is better)"), fontsize=9)
        ax.set_xlabel("pruning ratio")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def feature_label(results: list[dict]) -> str:
    feature = results[0]["feature"]
    return f"EfficientNet-{feature.capitalize()}" if feature.startswith("lite") else feature


def build(cfg: DictConfig | None = None, progress: bool = True, title: str = "Training-free subset quality",
          section: str = "pruning", note: str = "", plan: sweeps.Plan | None = None) -> pd.DataFrame:
    """The `pruning` section of eval/tables.py (and, with another sweep, `imbalanced`)."""
    cfg = cfg if cfg is not None else compose("eval/subset_quality")
    plan = plan or sweeps.pruning(cfg)
    results = evaluate_runs([r.run_dir for r in sweeps.require(plan, section)], cfg, progress)
    agg = aggregate(results)
    out = Path(cfg.sweep.out)
    note = (note + " " if note else "") + f"Rebuilt by `python eval/tables.py {section}`."
    write_text(out.with_suffix(".md"), markdown(agg, feature_label(results), _corpus_size(results), title, note))
    figure(agg, out.with_suffix(".png"))
    return agg


def ablation(cfg: DictConfig, progress: bool = True) -> pd.DataFrame:
    """The `ablation` section: rsprune variants at one ratio, mean +- std over seeds -> <out>.md."""
    a = cfg.ablation
    names = {r.run_dir: r.label for r in sweeps.require(sweeps.ablation(cfg), "ablation")}
    results = evaluate_runs(list(names), cfg, progress)
    for r in results:
        r["variant"] = names[r["run_dir"]]
    agg = aggregate(results, ("variant",))
    agg = agg.set_index("variant").loc[list(dict.fromkeys(names.values()))].reset_index()  # config order
    lines = [f"# Ablations of rsprune at ratio {a.ratio} (corpus of {_corpus_size(results)} usable images)", "",
             f"Mean +- std over seeds {list(a.seeds)}; metrics as in pruning_quality.md "
             f"({feature_label(results)} space). Variants are `configs/eval/subset_quality.yaml:ablation.variants`; "
             "rebuilt by `python eval/tables.py ablation`.", ""]
    write_text(Path(a.out).with_suffix(".md"), "\n".join(lines + rows(agg, "variant", metrics_of(agg))) + "\n")
    return agg


def _corpus_size(results: list[dict]) -> int:
    s = read_json(Path(results[0]["run_dir"]) / "summary.json")
    return int(s["counts"]["usable"])
