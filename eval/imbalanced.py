"""The imbalanced development corpus of issue 14: `python eval/imbalanced.py out=DIR`.

A corpus whose classes the scene reference never labelled: the NWPU-RESISC45 classes of
`nwpu12/train`, each cut to a Zipf-like size falling by `factor` from `top` (400 down to 25 by
default), built as a folder of symbolic links `<out>/nwpu_zipf/<class>/<file>` to the shared
images (nothing is copied; the folder names are read by the evaluation only, never by a
selection). Which class gets which size and which images a class keeps are seeded draws, so
the corpus is the same on every machine. The scene reference stays AID (disjoint from NWPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT_NAME = "nwpu_zipf"


def zipf_sizes(n_classes: int, top: int, factor: float) -> list[int]:
    """Class sizes top * factor**(-i / (n - 1)), i = 0..n-1: a geometric (Zipf-like) fall by `factor`."""
    if n_classes < 2:
        return [int(top)] * n_classes
    return [int(round(top * factor ** (-i / (n_classes - 1)))) for i in range(n_classes)]


def build(source: str | Path, out: str | Path, top: int = 400, factor: float = 16.0, seed: int = 0,
          classes: list[str] | None = None, root_name: str = ROOT_NAME) -> Path:
    """Link the imbalanced corpus under `<out>/<root_name>`; returns that folder. `classes`: the
    source's class folders to use (None: all). Idempotent: an existing folder with the same links
    is kept, a different one is an error (never silently mixed)."""
    from rsprune.cli import UsageError

    source = Path(source)
    if not source.is_dir():
        raise UsageError(f"class folders not found: {source} (set data_root= or RSPRUNE_DATA)")
    have = sorted(p.name for p in source.iterdir() if p.is_dir())
    missing = sorted(set(classes or []) - set(have))
    if missing:
        raise UsageError(f"classes not under {source}: {', '.join(missing)}")
    classes = sorted(classes) if classes else have
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))  # which class is large: a seeded draw, not the alphabet
    sizes = zipf_sizes(len(classes), top, factor)
    plan = {}
    for rank, ci in enumerate(order):
        files = sorted(f.name for f in (source / classes[ci]).iterdir())
        if sizes[rank] > len(files):
            raise ValueError(f"class {classes[ci]} has {len(files)} images, fewer than {sizes[rank]}")
        plan[classes[ci]] = sorted(files[i] for i in rng.choice(len(files), sizes[rank], replace=False))
    dst = Path(out) / root_name
    if dst.exists():
        have = {c.name: sorted(f.name for f in c.iterdir()) for c in dst.iterdir() if c.is_dir()}
        if have != plan:
            raise FileExistsError(f"{dst} holds another corpus; remove it or choose another out=")
        return dst
    tmp = dst.with_name(f".tmp-{root_name}-{os.getpid()}")
    for c, files in plan.items():
        (tmp / c).mkdir(parents=True)
        for f in files:
            (tmp / c / f).symlink_to((source / c / f).resolve())
    tmp.rename(dst)  # the whole tree appears at once
    return dst


def run(cfg) -> dict:
    dst = build(Path(str(cfg.data_root)) / "nwpu12" / "train", str(cfg.out), int(cfg.top), float(cfg.factor),
                int(cfg.corpus_seed))
    sizes = {c.name: len(list(c.iterdir())) for c in sorted(dst.iterdir())}
    print(f"{dst}: {sum(sizes.values())} images, " + ", ".join(f"{c} {n}" for c, n in sizes.items()))
    return {"corpus": str(dst), "sizes": sizes}


if __name__ == "__main__":
    from rsprune.cli import main

    main("eval/imbalanced", run, __doc__)


def section(cfg) -> object:
    """The `imbalanced` section of eval/tables.py: build the corpus, then the pruning table on it
    (every method x ratio x seed; the scene reference is the default split's AID reference)."""
    from omegaconf import OmegaConf

    from eval.pruning_table import build as build_table

    dst = run(cfg)["corpus"]
    cfg = OmegaConf.merge(cfg, {"sweep": {"overrides": [*cfg.sweep.overrides, f"data.corpus=[{dst}]"]}})
    note = (f"Corpus: `eval/imbalanced.py` (nwpu12/train classes cut to {cfg.top} down to "
            f"{round(cfg.top / cfg.factor)} images, Zipf-like); reference: the default split's AID reference "
            "(disjoint); KL to uniform is over the 12 NWPU classes, which no selection reads.")
    return build_table(cfg, title="Subset quality on an imbalanced corpus from another source",
                       section="imbalanced", note=note)


def heldout_section(cfg) -> object:
    """The `imbalanced_heldout` section: the same check on imbalanced corpora that were never used
    to choose a default (other class-to-size draws, a milder imbalance, another source's classes
    with another reference), at `heldout.ratios`: KL to uniform over the corpus's folder classes
    and FD to the corpus, every method plus rsprune variants; a figure beside the table."""
    import pandas as pd
    from omegaconf import OmegaConf

    from eval.pruning_table import aggregate, cell, feature_label, sweep_runs, variant_runs
    from eval.subset_quality import evaluate_runs
    from rsprune.cache import write_text

    h = cfg.heldout
    bounds = list(h.get("bounds") or {})  # run like variants, reported apart
    blocks, feature = [], None
    for name, spec in h.corpora.items():
        source = str(spec.get("source") or "nwpu12/train")  # under data_root; its class folders
        root_name = ROOT_NAME if source == "nwpu12/train" else f"{source.split('/')[0]}_zipf"
        top = int(spec.get("top") or cfg.top)
        dst = build(Path(str(cfg.data_root)) / source, Path(str(cfg.out)) / str(name), top, float(spec.factor),
                    int(spec.corpus_seed), list(spec.get("classes") or []) or None, root_name)
        on = [*cfg.sweep.overrides, f"data.corpus=[{dst}]"]
        reference = spec.get("reference")  # under data_root; none: the default split's AID reference
        if reference:
            on.append(f"data.reference={Path(str(cfg.data_root)) / str(reference)}")
        root = Path(str(h.runs_root)) / str(name)
        sweep = OmegaConf.create({"methods": list(h.methods), "ratios": list(h.ratios), "seeds": list(h.seeds),
                                  "runs_root": str(root), "overrides": on})
        labels = variant_runs(root, h.variants, h.ratios, h.seeds, on)
        labels |= variant_runs(root, h.get("bounds"), h.ratios, h.seeds, on)
        results = evaluate_runs(sweep_runs(sweep) + list(labels), cfg)
        feature = feature_label(results)
        for r in results:
            r["method"] = labels.get(r["run_dir"], r["method"])
        agg = aggregate(results, ("method", "ratio")).assign(corpus=str(name))
        sizes = sorted((len(list(c.iterdir())) for c in dst.iterdir()), reverse=True)
        agg["sizes"] = (f"{source}: {len(sizes)} classes, {sizes[0]}..{sizes[-1]}, {sum(sizes)} images, "
                        f"class-to-size draw {spec.corpus_seed}; reference "
                        + (f"{reference}, all of it" if reference else "the default split's AID reference"))
        blocks.append(agg)
    df = pd.concat(blocks)
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
    write_text(Path(str(h.out)).with_suffix(".md"), "\n".join(lines))
    heldout_figure(df[~df.method.isin(bounds)], Path(str(h.out)).with_suffix(".png"))
    return df


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
