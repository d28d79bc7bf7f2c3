"""The imbalanced development corpus (`python eval/imbalanced.py out=DIR`) and its two tables.

A corpus whose classes the scene reference never labelled: the NWPU-RESISC45 classes of
`nwpu12/train`, each cut to a Zipf-like size falling by `factor` from `top` (400 down to 25 by
default), built as a folder of symbolic links `<out>/nwpu_zipf/<class>/<file>` to the shared
images (rsprune/zipf_corpus.py). The scene reference stays AID (disjoint from NWPU).

The sections `imbalanced` and `imbalanced_heldout` of eval/tables.py read prune runs: their
corpora and runs are planned by rsprune/sweeps.py and run by `python prune/sweep.py SECTION`;
here they are measured and formatted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rsprune import sweeps
from rsprune.zipf_corpus import build

def run(cfg) -> dict:
    dst = build(Path(str(cfg.data_root)) / "nwpu12" / "train", str(cfg.out), int(cfg.top), float(cfg.factor),
                int(cfg.corpus_seed))
    sizes = {c.name: len(list(c.iterdir())) for c in sorted(dst.iterdir())}
    print(f"{dst}: {sum(sizes.values())} images, " + ", ".join(f"{c} {n}" for c, n in sizes.items()))
    return {"corpus": str(dst), "sizes": sizes}


def section(cfg) -> object:
    """The `imbalanced` section of eval/tables.py: the pruning table on the development corpus
    (every method x ratio x seed; the scene reference is the default split's AID reference)."""
    from eval.pruning_table import build as build_table

    note = (f"Corpus: `eval/imbalanced.py` (nwpu12/train classes cut to {cfg.top} down to "
            f"{round(cfg.top / cfg.factor)} images, Zipf-like); reference: the default split's AID reference "
            "(disjoint); KL to uniform is over the 12 NWPU classes, which no selection reads.")
    return build_table(cfg, title="Subset quality on an imbalanced corpus from another source",
                       section="imbalanced", note=note, plan=sweeps.imbalanced(cfg))


def heldout_section(cfg) -> object:
    """The `imbalanced_heldout` section: the same check on imbalanced corpora that were never used
    to choose a default (other class-to-size draws, a milder imbalance, another source's classes
    with another reference), at `heldout.ratios`: KL to uniform over the corpus's folder classes
    and FD to the corpus, every method plus rsprune variants; a figure beside the table."""
    from rsprune.cache import write_text

    plan = sweeps.imbalanced_heldout(cfg)  # building: rsprune/sweeps.py; running: prune/sweep.py
    sweeps.require(plan, "imbalanced_heldout")
    df, feature = heldout_results(cfg, plan)
    bounds = list(cfg.heldout.get("bounds") or {})  # run like variants, reported apart
    out = Path(str(cfg.heldout.out))
    write_text(out.with_suffix(".md"), heldout_markdown(df, cfg.heldout, feature, bounds))
    heldout_figure(df[~df.method.isin(bounds)], out.with_suffix(".png"))
    return df


def heldout_results(cfg, plan: sweeps.Plan):
    """(per corpus, method and ratio: the mean and std of every metric over seeds; the feature label)."""
    import pandas as pd

    from eval.pruning_table import aggregate, feature_label
    from eval.subset_quality import evaluate_runs

    labels = {r.run_dir: r.label for r in plan.runs if r.label is not None}
    blocks, feature = [], None
    for name, c in plan.info.items():
        results = evaluate_runs(c["runs"], cfg)
        feature = feature_label(results)
        for r in results:
            r["method"] = labels.get(r["run_dir"], r["method"])
        agg = aggregate(results, ("method", "ratio")).assign(corpus=name)
        dst = Path(c["corpus"])
        sizes = sorted((len(list(d.iterdir())) for d in dst.iterdir()), reverse=True)
        agg["sizes"] = (f"{c['source']}: {len(sizes)} classes, {sizes[0]}..{sizes[-1]}, {sum(sizes)} images, "
                        f"class-to-size draw {c['corpus_seed']}; reference "
                        + (f"{c['reference']}, all of it" if c["reference"] else "the default split's AID reference"))
        blocks.append(agg)
    return pd.concat(blocks), feature


def heldout_markdown(df, h, feature: str, bounds: list[str]) -> str:
    """The held-out table: per corpus and ratio, the methods ranked by KL to uniform, bounds below."""
    from eval.pruning_table import cell

    lines = [f"# Class balance on held-out imbalanced corpora (ratios {', '.join(map(str, h.ratios))})", "",
             f"Mean ± std (ddof 0) over seeds {list(h.seeds)}. Corpora built by `eval/imbalanced.py` from "
             "the class folders each heading names, with class-to-size draws other than the development "
             "corpus's (`corpus_seed=0`); no default was chosen on them. Each heading names the scene reference. "
             "KL to uniform over the corpus's folder classes, which no selection reads (lower = more balanced); "
             f"FD of the subset to the corpus in {feature} space. "
             "Rebuilt by `python eval/tables.py imbalanced_heldout`.", ""]
    if bounds:
        lines += ["Below each table, bounds that read the corpus's class folders (`scenes.assign=folder`: the "
                  "true classes as strata, which no label-free method has): what the same selection reaches "
                  "when its strata are right. They are not methods and are not ranked.", ""]
    for (name, ratio), part in df.groupby(["corpus", "ratio"], sort=False):
        ref = part.set_index("method")
        ranked = part[~part.method.isin(bounds)]
        lines += [f"## corpus {name} ({part.sizes.iloc[0]}), ratio {ratio}", "",
                  "| method | KL to uniform ↓ | FD to corpus ↓ |", "|---|---|---|"]
        for _, r in ranked.sort_values("kl_uniform").iterrows():  # the most balanced in bold, FD never
            lines.append(f"| {r.method} | {cell(r, 'kl_uniform', ranked.kl_uniform.min())} | {cell(r, 'fd', np.nan)} |")
        if {"rsprune", "kmeans_uniform+entropy"} <= set(ref.index):
            lines += ["", f"rsprune / kmeans_uniform+entropy KL: "
                          f"{ref.kl_uniform['rsprune'] / ref.kl_uniform['kmeans_uniform+entropy']:.2f}x"]
        for b in (b for b in bounds if b in ref.index):
            r = ref.loc[b]
            lines += ["", f"Bound, {b}: KL {cell(r, 'kl_uniform', np.nan)}, FD {cell(r, 'fd', np.nan)}"]
        lines.append("")
    return "\n".join(lines)


def heldout_figure(df, path: Path) -> None:
    """Per corpus and ratio, rsprune's KL to uniform over the best other method's (variants
    excluded): under 1 means rsprune is the most balanced; error bars from the two stds."""
    from rsprune.plots import pyplot, save_png

    plt = pyplot()

    corpora = list(dict.fromkeys(df.corpus))
    ratios = sorted(df.ratio.unique())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(corpora) + 2), 3.8))
    width = 0.8 / len(ratios)
    for k, ratio in enumerate(ratios):
        x, y, err = [], [], []
        for i, name in enumerate(corpora):
            part = df[(df.corpus == name) & (df.ratio == ratio)].set_index("method")
            others = part[~part.index.str.startswith("rsprune")]
            if "rsprune" not in part.index or others.empty:
                continue
            best = others.kl_uniform.idxmin()
            r, b = part.loc["rsprune"], others.loc[best]
            x.append(i + (k - (len(ratios) - 1) / 2) * width)
            y.append(r.kl_uniform / b.kl_uniform)
            err.append(y[-1] * (r.kl_uniform_std / r.kl_uniform + b.kl_uniform_std / b.kl_uniform))
        ax.bar(x, y, width, yerr=err, capsize=2, label=f"ratio {ratio}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(corpora)), corpora)
    ax.set_ylabel("rsprune KL / best other method's KL")
    ax.set_title("Held-out imbalanced corpora: under 1 = rsprune most class-balanced", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    from rsprune.cli import main

    main("eval/imbalanced", run, __doc__)
