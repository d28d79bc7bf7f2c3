"""The convergence report: per arm and step, mean, spread (std over runs) and number of runs of
each metric; paired statistics between arms (eval/paired.py); results/convergence.md and
results/convergence.png (curves with +-1 std bands).

The per-step tables print `mean ± std (n)` (a single run: its value with `(n=1)`). Differences
between arms are called only from the paired t-test over seeds: runs of one seed share initial
weights, training noise and test latents, so the spread within an arm overstates the noise of a
difference. Where runs kept per-image held-out losses, the natural-mix, class-balanced and
worst-class held-out losses are reported, with a paired bootstrap over seeds x images beside the test.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from rsprune.cache import write_text
from rsprune.cli import UsageError

from eval import paired

# (column, table heading, format) of each reported metric, in the order of the tables and panels
METRICS = [("fd", "{metric} against the whole test split", "{:.2f}"),
           ("fd_balanced", "{metric} against the class-balanced test split", "{:.2f}"),
           ("fid", "FID (Inception-v3 pool3, 299 px) against the whole test split", "{:.2f}"),
           ("fid_balanced", "FID (Inception-v3 pool3, 299 px) against the class-balanced test split", "{:.2f}"),
           ("kid", "KID x 1000 against the whole test split (std over subsets in the CSV)", "{:.2f}"),
           ("memorisation", "memorisation rate (share of samples nearer a training image than the {pct}th "
                            "percentile of test-to-train distances)", "{:.3f}"),
           ("heldout_loss", "held-out denoising loss on the test split, natural mix (training log)", "{:.4f}"),
           ("heldout_loss_balanced", "held-out denoising loss, class-balanced (mean of per-class means; "
                                     "per-image files)", "{:.4f}"),
           ("heldout_loss_worst_class", "held-out denoising loss of the worst class (highest class mean; "
                                        "per-image files)", "{:.4f}")]
# held-out columns with a bootstrap over seeds x images where per-image files exist: column -> class-balanced
BOOTSTRAP = {"heldout_loss": False, "heldout_loss_balanced": True}
SCALE = {"kid": 1000.0}
FID_KEYS = ("fid", "fid_balanced")  # absent from records scored before FID was


def check_comparable(curves: dict[str, pd.DataFrame], settings: list[str]) -> None:
    """UsageError unless every scored row of every run shares the same settings."""
    seen = {}
    for name, c in curves.items():
        scored = c.dropna(subset=["fd"])
        for key in {tuple(str(v) for v in r) for r in scored[settings].itertuples(index=False)}:
            seen.setdefault(key, []).append(name)
    if len(seen) > 1:
        parts = [" ".join(f"{k}={str(v)[:12]}" for k, v in zip(settings, key)) + f" [{', '.join(sorted(set(names)))}]"
                 for key, names in seen.items()]
        raise UsageError("runs scored under different settings do not compare (rescore them alike): "
                         + " | ".join(parts))


def long_table(curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run and step: run, arm, run_seed (the training seed; None when unknown), step and
    the metric columns (`seed` is the sampling seed of the scored rows)."""
    long = pd.concat([c.assign(run=name) for name, c in curves.items()], ignore_index=True)
    if "run_seed" not in long:
        long["run_seed"] = None
    return long


def aggregate(curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table: arm, step, metric column, mean, std (ddof 1; 0 for one run), n runs."""
    long = long_table(curves)
    out = []
    for col, _, _ in METRICS:
        if col not in long:
            continue
        vals = long.dropna(subset=[col]).astype({col: float})
        for (arm, step), g in vals.groupby(["arm", "step"], sort=True):
            v = g[col].to_numpy() * SCALE.get(col, 1.0)
            out.append({"arm": arm, "step": int(step), "metric": col, "mean": float(v.mean()),
                        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))})
    return pd.DataFrame(out, columns=["arm", "step", "metric", "mean", "std", "n"])


def cell(g: pd.DataFrame, fmt: str) -> str:
    if not len(g):
        return "-"
    r = g.iloc[0]
    return f"{fmt.format(r['mean'])} ± {fmt.format(r['std'])} ({int(r['n'])})" if r["n"] > 1 else \
        f"{fmt.format(r['mean'])} (n=1)"


def steps_to_reach(agg: pd.DataFrame, arm: str, target: float) -> int | None:
    """First step whose arm-mean FD is at or under `target` (None if never)."""
    g = agg[(agg.arm == arm) & (agg.metric == "fd") & (agg["mean"] <= target)]
    return int(g["step"].min()) if len(g) else None


def default_target(agg: pd.DataFrame) -> float | None:
    """The worst final arm-mean FD: a level every arm reaches, so the steps compare speed."""
    fd = agg[agg.metric == "fd"].sort_values("step")
    finals = [g["mean"].iloc[-1] for _, g in fd.groupby("arm")]
    return float(max(finals)) if finals else None


def paired_section(curves: dict[str, pd.DataFrame], arms: list[str], per_image: dict | None,
                   classes) -> list[str]:
    """The paired-statistics section: one row per metric, step and arm pair (eval/paired.py)."""
    long = long_table(curves)
    cols = [c for c, _, _ in METRICS]
    comps = paired.comparisons(long, arms, cols, SCALE, per_image, classes, BOOTSTRAP)
    if not comps:
        return []
    fmts = {c: f for c, _, f in METRICS}
    n_runs, n_files = len(curves), len(per_image or {})
    if n_files == 0:
        avail = ("Per-image held-out losses are unavailable for these runs (no RUN/heldout/ files: they were "
                 "trained before the probe kept them), so the held-out loss pairs by seed only, and its "
                 "class-balanced and worst-class values and the bootstrap over images cannot be given.")
    else:
        avail = (f"Per-image held-out losses: {n_files} of {n_runs} runs ({len(classes or [])} test images, "
                 f"{len(set(classes or []))} classes).")
    n_tested = sum(r["p"] is not None for r in comps)
    return ["## Paired differences between arms", "", *paired.header(len(comps), n_tested), *paired.markdown_rows(
        comps, fmts), "", avail, ""]


def worst_class_lines(curves: dict[str, pd.DataFrame], arms: list[str]) -> list[str]:
    """Which class is worst, per arm, at the last step with a worst-class value."""
    long = long_table(curves)
    if "heldout_loss_worst_class_name" not in long:
        return []
    named = long.dropna(subset=["heldout_loss_worst_class_name"])
    if not len(named):
        return []
    step = int(named["step"].max())
    at = named[named.step == step]
    parts = [f"{a}: " + ", ".join(f"{c} ({n})" for c, n in at[at.arm == a]["heldout_loss_worst_class_name"]
                                  .value_counts().items()) for a in arms if (at.arm == a).any()]
    return [f"Worst class at step {step} (runs): " + "; ".join(parts) + ".", ""]


def markdown(agg: pd.DataFrame, arms: list[str], metric: str, target: float | None, cfg, info: dict,
             paired_lines: list[str] = (), worst_lines: list[str] = ()) -> str:
    lines = [f"# Convergence: {metric}, KID, memorisation and held-out loss per arm", "",
             f"{info['n_fake']} EMA samples per step, {str(cfg.sampler).upper()} {cfg.steps} steps, seed {cfg.seed}, "
             f"scored at {info['side']} px against the test split {info['test']} ({info['n_test']} images; "
             f"class-balanced resample: {info['n_balanced']}). Cells: mean ± std over runs (n runs). Rebuilt by "
             "`python eval/convergence.py` (or `python eval/tables.py convergence`).", ""]
    for col, head, fmt in METRICS:
        sub = agg[agg.metric == col]
        if not len(sub):
            continue
        pct = cfg.memorisation_percentile
        lines += [f"## {head.format(metric=metric, pct=pct)}", "", "| step | " + " | ".join(arms) + " |",
                  "|---:|" + "---:|" * len(arms)]
        for step in sorted(sub["step"].unique()):
            cells = [cell(sub[(sub.step == step) & (sub.arm == a)], fmt) for a in arms]
            lines.append(f"| {int(step)} | " + " | ".join(cells) + " |")
        lines.append("")
        if col == "heldout_loss_worst_class":
            lines += list(worst_lines)
    lines += list(paired_lines)
    if target is not None:
        how = "given" if cfg.target_fd is not None else "the worst final arm-mean FD"
        lines += [f"Steps to reach arm-mean {metric} <= {target:.2f} ({how}):", "", "| arm | steps |", "|---|---:|"]
        for a in arms:
            reach = steps_to_reach(agg, a, target)
            lines.append(f"| {a} | {reach if reach is not None else 'not reached'} |")
    return "\n".join(lines) + "\n"


def figure(agg: pd.DataFrame, arms: list[str], metric: str, path: Path) -> None:
    from rsprune.plots import pyplot, save_png

    plt = pyplot()

    panels = [(c, h) for c, h, _ in METRICS if len(agg[agg.metric == c])]
    cols = min(3, max(len(panels), 1))
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    titles = {"fd": metric, "fd_balanced": f"{metric}, balanced test", "fid": "FID (Inception)",
              "fid_balanced": "FID (Inception), balanced test", "kid": "KID x 1000",
              "memorisation": "memorisation rate", "heldout_loss": "held-out loss",
              "heldout_loss_balanced": "held-out loss, class-balanced",
              "heldout_loss_worst_class": "held-out loss, worst class"}
    for ax, (col, _) in zip(axes.flat, panels):
        for i, a in enumerate(arms):
            g = agg[(agg.metric == col) & (agg.arm == a)].sort_values("step")
            if not len(g):
                continue
            color = f"C{i}"
            ax.errorbar(g["step"], g["mean"], yerr=g["std"], marker="o", capsize=4, color=color,
                        label=f"{a} (n={int(g['n'].max())})")  # bars: a lone scored step shows its spread too
            ax.fill_between(g["step"], g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.2)
        ax.set_title(titles[col], fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def yardstick_lines(yard: dict[str, dict], arms: list[str], metric: str) -> list[str]:
    """Real training images scored like samples, per arm (mean ± std over its runs' seeded draws)."""
    if not yard:
        return []
    lines = ["## Yardstick: real training images scored like samples", "",
             f"{metric} and KID of as many REAL training images of each run (a seeded draw) as samples, against "
             "the same test split under the same settings: where a perfect model of that training set would land "
             "(runs of one arm share their training set, hence one value).", ""]
    cols = [("fd", "FD, whole test split", 1.0), ("fd_balanced", "FD, class-balanced", 1.0),
            ("fid", "FID, whole", 1.0), ("fid_balanced", "FID, class-balanced", 1.0), ("kid", "KID x 1000", 1000.0)]
    # FID columns only where some record was scored with FID (records from before FID have none)
    cols = [c for c in cols if c[0] not in FID_KEYS or any(y.get(c[0]) is not None for y in yard.values())]
    lines += ["| arm | " + " | ".join(c[1] for c in cols) + " | runs |", "|---|" + "---:|" * (len(cols) + 1)]
    for a in arms:
        ys = [y for y in yard.values() if y["arm"] == a]
        if not ys:
            continue
        cells = []
        for key, _, k in cols:
            if any(y.get(key) is None for y in ys):
                cells.append("-")
                continue
            v = pd.Series([y[key] * k for y in ys], dtype=float)
            sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():.2f} ± {sd:.2f}" if sd >= 0.005 else f"{v.mean():.2f}")  # 0.00: one value
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {len(ys)} |")
    return lines + [""]


def write(curves: dict[str, pd.DataFrame], cfg, results_dir: Path, yard: dict | None = None,
          per_image: dict | None = None, classes=None) -> dict:
    """Aggregate, write convergence.md and convergence.png; return the numbers."""
    agg = aggregate(curves)
    arms = list(dict.fromkeys(a for c in curves.values() for a in c["arm"]))
    scored = pd.concat([c.dropna(subset=["fd"]) for c in curves.values()])
    metric = str(scored["metric"].iloc[0]) if len(scored) else "FD"
    first = scored.iloc[0] if len(scored) else {}
    info = {k: (int(float(first[k])) if len(scored) else "?") for k in ("n_fake", "side", "n_test", "n_balanced")}
    info["test"] = str(first.get("test_sha256", "?"))[:12]
    target = float(cfg.target_fd) if cfg.target_fd is not None else default_target(agg)
    text = markdown(agg, arms, metric, target, cfg, info, paired_section(curves, arms, per_image, classes),
                    worst_class_lines(curves, arms)) + "\n".join(["", *yardstick_lines(yard or {}, arms, metric)])
    write_text(results_dir / "convergence.md", text)
    figure(agg, arms, metric, results_dir / "convergence.png")
    print(f"wrote {results_dir / 'convergence.md'} and {results_dir / 'convergence.png'}")
    return {"aggregate": agg.to_dict("records"), "target_fd": target,
            "steps_to_target": {a: steps_to_reach(agg, a, target) if target is not None else None for a in arms},
            "test_sha256": str(first.get("test_sha256")) if len(scored) else None}
