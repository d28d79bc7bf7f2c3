"""The run report: figures a user looks at before trusting a subset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from rsprune.imageio import UnreadableImage, load_sized
from rsprune.plots import pyplot, save_png


def entropy_histogram(m: pd.DataFrame, cut: float, score: str, path: Path) -> None:
    plt = pyplot()
    v = m[f"entropy_{score}"].dropna()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(v, bins=80, color="tab:blue", alpha=0.8)
    ax.axvline(cut, color="tab:red", lw=2, label=f"cut {cut:.2f} bits")
    ax.set_xlabel(f"{score} entropy (bits)")
    ax.set_ylabel("images")
    ax.set_title(f"Stage 1: {(v < cut).sum()} of {len(v)} readable images under the cut")
    ax.legend()
    save_png(fig, path, tight=True)


def scene_histogram(m: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    g = m[m.scene_name != ""].groupby("scene_name").agg(before=("id", "size"), after=("selected", "sum"))
    g = g.sort_values("before", ascending=False)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(g)), 4))
    x = np.arange(len(g))
    ax.bar(x - 0.2, g.before / g.before.sum(), 0.4, label=f"corpus ({g.before.sum()})")
    ax.bar(x + 0.2, g.after / max(1, g.after.sum()), 0.4, label=f"kept ({g.after.sum()})")
    ax.set_xticks(x, g.index, rotation=75, fontsize=7)
    ax.set_ylabel("share of images")
    ax.set_title("Scene strata before and after selection")
    ax.legend()
    save_png(fig, path, tight=True)


def scene_similarity(m: pd.DataFrame, info: dict, path: Path) -> None:
    """Stage 3 diagnostics: the corpus's best-scene similarity against the calibrated threshold
    (with the reference's own held-out quantiles), and the pseudo-scene sizes."""
    plt = pyplot()
    v = m.scene_similarity.dropna()
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 2]})
    ax[0].hist(v, bins=60, color="tab:blue", alpha=0.8, label="corpus best similarity")
    ax[0].axvline(info["threshold"], color="tab:red", lw=2, label=f"threshold {info['threshold']:.3f}")
    for name, q in (info.get("reference_heldout_similarity") or {}).items():
        ax[0].axvline(q, color="tab:green", lw=0.8, ls=":")
    ax[0].plot([], [], color="tab:green", ls=":", label="reference held-out p5..p95")
    ax[0].set_xlabel("cosine to the best scene")
    ax[0].set_title(f"{info['matched_share']:.0%} matched ({info['rule']})", fontsize=9)
    ax[0].legend(fontsize=7)
    sizes = info.get("pseudo_scene_sizes") or []
    ax[1].bar(range(len(sizes)), sorted(sizes, reverse=True), color="tab:orange")
    from matplotlib.ticker import MaxNLocator

    ax[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[1].set_xlabel("pseudo-scene (sorted by size)")
    ax[1].set_ylabel("images")
    ax[1].set_title(f"{len(sizes)} pseudo-scenes (rule: {info.get('pseudo_size_rule')})", fontsize=9)
    save_png(fig, path, tight=True)


def scene_mass(fit: dict, names: dict, path: Path) -> None:
    """selection.mass=auto: volume per image against images per stratum (log-log) with the
    least-squares line the over-sampling beta comes from (slope -1: over-sampled; 0: not)."""
    plt = pyplot()
    n = np.asarray(fit["stratum_images"], float)
    per = np.asarray(fit["stratum_volume_per_image"], float)
    used = (n >= fit["min_stratum"]) & (per > 0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(n[used], per[used], s=14, label="strata in the fit")
    ax.scatter(n[~used & (per > 0)], per[~used & (per > 0)], s=14, marker="x", color="grey", label="too small")
    largest = np.argsort(-n, kind="stable")[:6]  # numbered on the plot, named in a key: names overlap there
    for k, i in enumerate(largest, 1):
        ax.annotate(str(k), (n[i], per[i]), xytext=(3, 3), textcoords="offset points", fontsize=7)
    key = "\n".join(f"{k} {str(names.get(fit['strata'][i], fit['strata'][i]))[:22]}" for k, i in enumerate(largest, 1))
    ax.text(0.02, 0.02, key, transform=ax.transAxes, fontsize=6, va="bottom", ha="left",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    if fit.get("fit_slope_intercept"):  # the line beta came from (prune/volume.py), not a refit
        slope, icpt = fit["fit_slope_intercept"]
        xs = np.linspace(np.log(n[used]).min(), np.log(n[used]).max(), 20)
        ax.plot(np.exp(xs), np.exp(icpt + slope * xs), color="tab:red", label=f"fit: slope {slope:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("images in stratum")
    ax.set_ylabel("volume per image (relative to the median image)")
    ax.set_title(f"scene mass: beta {fit['oversampling_beta']:.2f}, quota exponent {fit['alpha_effective']:.2f}",
                 fontsize=9)
    ax.legend(fontsize=7)
    save_png(fig, path, tight=True)


def plain_log_ticks(ax) -> None:
    """Log axes labelled 20, 50, 100, ... : matplotlib's 2x10^2-style minor labels collide within a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def cluster_sizes(m: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    g = m[m.cluster >= 0].groupby("cluster").agg(size=("id", "size"), kept=("selected", "sum"))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].hist(g["size"], bins=50, color="tab:blue")
    ax[0].set_xlabel("cluster size")
    ax[0].set_ylabel("clusters")
    ax[1].scatter(g["size"], g.kept, s=6, alpha=0.6)
    ax[1].set_xlabel("cluster size")
    ax[1].set_ylabel("kept from cluster")
    fig.suptitle(f"{len(g)} clusters")
    save_png(fig, path, tight=True)


NOTES = {"pseudo_": "pseudo_NN: a pseudo-scene, images that matched no reference scene, grouped by k-means",
         "unmatched": "unmatched: images that matched no reference scene (scenes.pseudo_size=0)"}


def montage(m: pd.DataFrame, n_scenes: int, seed: int, path: Path, per_row: int = 8, tile: int = 64) -> None:
    """Per scene: a row of kept images and a row of pruned ones."""
    rng = np.random.default_rng(seed)
    named = m[m.scene_name != ""]
    scenes = named.groupby("scene_name").size().sort_values(ascending=False).index[:n_scenes]
    if named.empty:  # methods without scenes: one pair of rows over the whole corpus
        scenes, named = ["all"], m.assign(scene_name="all")
    label_w = 150
    notes = [NOTES[k] for k in NOTES if any(str(s).startswith(k) for s in scenes)]
    canvas = Image.new("RGB", (label_w + per_row * tile, 2 * len(scenes) * tile + 14 * len(notes) + 4 * bool(notes)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for j, note in enumerate(notes):  # a row label that is not a reference class says what it is
        draw.text((4, 2 * len(scenes) * tile + 2 + 14 * j), note, fill="black")
    for r, s in enumerate(scenes):
        rows = named[(named.scene_name == s) & named.readable]
        for k, (name, part) in enumerate((("kept", rows[rows.selected]), ("pruned", rows[~rows.selected]))):
            y = (2 * r + k) * tile
            draw.text((4, y + tile // 2 - 6), f"{s[:18]} {name}", fill="black")
            pick = part.path.to_numpy()
            pick = pick[rng.permutation(len(pick))[:per_row]] if len(pick) else pick
            for j, p in enumerate(sorted(pick)):
                try:
                    canvas.paste(Image.fromarray(load_sized(p, tile)), (label_w + j * tile, y))
                except UnreadableImage:
                    pass
    from rsprune.cache import atomic_path

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def write_report(folder: Path, m: pd.DataFrame, cut: float, score: str, n_scenes: int, seed: int,
                 scenes: dict | None = None, mass_fit: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entropy_histogram(m, cut, score, folder / "entropy_histogram.png")
    if (m.scene_name != "").any():
        scene_histogram(m, folder / "scene_histogram.png")
    if scenes and scenes.get("similarity"):  # none to show when the strata are the corpus's folders
        scene_similarity(m, scenes, folder / "scene_similarity.png")
    if mass_fit and "stratum_images" in mass_fit:
        named = m[m.scene_name != ""].drop_duplicates("scene")
        scene_mass(mass_fit, dict(zip(named.scene, named.scene_name)), folder / "scene_mass.png")
    if (m.cluster >= 0).any():
        cluster_sizes(m, folder / "cluster_sizes.png")
    montage(m, n_scenes, seed, folder / "montage_kept_vs_pruned.png")
