"""Paired statistics for comparing arms whose runs are paired by seed (and, for the held-out loss,
by test image).

Runs of one seed share their initial weights, the noise of every training step and the test
latents, so two arms' values at one seed differ by the arm, not by luck of the draw: the
comparison is on per-seed differences d_s = a_s - b_s.

- `ttest`: the mean of d, its paired standard error std(d, ddof=1) / sqrt(n) and the paired
  t-test (scipy.stats.ttest_rel, two-sided, n - 1 degrees of freedom). This is the test every
  verdict is called from.
- `bootstrap`: for per-image losses, a paired bootstrap over seeds x images: seeds resampled
  with replacement, and images resampled with replacement within their class (the test split is
  drawn per class); the statistic is the mean difference in the natural mix or the mean of
  per-class mean differences (class-balanced). Percentile 95% interval and two-sided p. With
  few seeds it is optimistic (3 seeds give 10 distinct seed draws), so it is reported beside
  the t-test, never instead of it.
- `holm`: which of a family of p-values stay below alpha under Holm's step-down correction.
"""
from __future__ import annotations

import numpy as np

ALPHA = 0.05
T_TEST = "paired t-test over seeds (scipy.stats.ttest_rel, two-sided)"
BOOTSTRAP = "paired bootstrap over seeds x images (images resampled within class)"
N_BOOT = 10_000


def ttest(a, b) -> dict:
    """Per-seed differences a - b and their paired t-test; p and t are None below two pairs or
    when every difference is the same up to rounding (no spread: no test)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    n = len(d)
    out = {"diffs": d.tolist(), "n": n, "mean": float(d.mean()) if n else float("nan"),
           "se": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None, "t": None, "p": None, "df": n - 1}
    if n > 1 and np.ptp(d) > 1e-12 * max(1.0, float(np.abs(d).max())):
        r = stats.ttest_rel(a, b)
        out |= {"t": float(r.statistic), "p": float(r.pvalue)}
    return out


def holm(pvalues: list[float | None], alpha: float = ALPHA) -> list[bool | None]:
    """Holm-Bonferroni over the tested p-values (None: untested, stays None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    out: list[bool | None] = [None] * len(pvalues)
    m, rejecting = len(order), True
    for k, i in enumerate(order):
        rejecting = rejecting and pvalues[i] <= alpha / (m - k)
        out[i] = rejecting
    return out


def _class_groups(classes) -> list[np.ndarray]:
    labels = np.asarray(classes)
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def bootstrap(diffs: np.ndarray, classes, balanced: bool = False, n_boot: int = N_BOOT, seed: int = 0,
              chunk: int = 1000) -> dict:
    """Paired bootstrap of per-image differences `diffs` (n_seeds, n_images), each row one seed's
    a - b (mean over timesteps): {mean, lo, hi, p, n_boot} of the natural-mix (or class-balanced)
    mean difference."""
    d = np.asarray(diffs, np.float64)
    groups = _class_groups(classes)
    rng = np.random.default_rng(seed)
    n_s, n_i = d.shape
    stats = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        per_seed = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=b) / n_s @ d   # (b, n_i): seeds resampled
        stat = np.zeros(b)
        for g in groups:  # images resampled within their class
            counts = rng.multinomial(len(g), np.full(len(g), 1 / len(g)), size=b)
            part = (per_seed[:, g] * counts).sum(axis=1)
            stat += part / (len(g) * len(groups)) if balanced else part / n_i
        stats.append(stat)
    stat = np.concatenate(stats)
    point = float(np.mean([d[:, g].mean() for g in groups])) if balanced else float(d.mean())
    lo, hi = np.percentile(stat, [2.5, 97.5])
    p = 2 * min((stat <= 0).mean(), (stat >= 0).mean())
    return {"mean": point, "lo": float(lo), "hi": float(hi), "p": float(max(min(p, 1.0), 1 / n_boot)),
            "n_boot": n_boot}


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def by_seed(long, col: str, arm: str, step: int) -> dict:
    """seed -> value of metric `col` of arm `arm` at `step` (a seed held by two runs is left out)."""
    g = long[(long.arm == arm) & (long.step == step)].dropna(subset=[col, "run_seed"])
    counts = g["run_seed"].value_counts()
    return {int(s): float(v) for s, v in zip(g["run_seed"], g[col]) if counts[s] == 1}


def comparisons(long, arms: list[str], cols: list[str], scale: dict, per_image: dict | None = None,
                classes=None, boot_cols: dict | None = None) -> list[dict]:
    """Every (metric, step, arm pair) with paired seeds: the paired t-test, the Holm verdict over
    all of them, and (for the `boot_cols` held-out columns, where every paired run has per-image
    losses at that step) the bootstrap over seeds x images. `long`: one row per run and step with
    columns run, arm, run_seed, step and the metric columns; `per_image`: run -> step -> (n_images,)."""
    out = []
    for col in cols:
        if col not in long:
            continue
        steps = sorted(long.dropna(subset=[col])["step"].astype(int).unique())
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                for step in steps:
                    va, vb = by_seed(long, col, a, step), by_seed(long, col, b, step)
                    seeds = sorted(set(va) & set(vb))
                    if not seeds:
                        continue
                    k = scale.get(col, 1.0)
                    r = ttest([va[s] * k for s in seeds], [vb[s] * k for s in seeds])
                    r |= {"metric": col, "step": int(step), "a": a, "b": b, "seeds": seeds, "boot": None}
                    if boot_cols and col in boot_cols and per_image is not None:
                        rows = [_image_row(long, per_image, arm, s, step) for s in seeds for arm in (a, b)]
                        if all(x is not None for x in rows):
                            d = np.stack([rows[j] - rows[j + 1] for j in range(0, len(rows), 2)])
                            r["boot"] = bootstrap(d, classes, balanced=boot_cols[col])
                    out.append(r)
    for r, keep in zip(out, holm([r["p"] for r in out])):
        r["holm"] = keep
    return out


def _image_row(long, per_image: dict, arm: str, seed: int, step: int):
    run = long[(long.arm == arm) & (long.run_seed == seed)]["run"]
    return per_image.get(str(run.iloc[0]), {}).get(int(step)) if len(run) else None


def verdict(r: dict, alpha: float = ALPHA) -> str:
    if r["p"] is None:
        return "untested (one seed)" if r["n"] < 2 else "untested (no spread)"
    return f"**difference** (p < {alpha:g})" if r["p"] < alpha else "none shown"


def _num(fmt: str):
    """fmt.format, without the sign of a value that rounds to zero (-0.0000 -> 0.0000)."""
    def f(x):
        s = fmt.format(x)
        return s[1:] if s.startswith("-") and not s.strip("-0.") else s
    return f


def markdown_rows(comps: list[dict], fmts: dict[str, str]) -> list[str]:
    """One table row per comparison (see `header`)."""
    rows = []
    for r in comps:
        num = _num(fmts[r["metric"]])
        diffs = " / ".join(num(x) for x in r["diffs"])
        se = "—" if r["se"] is None else num(r["se"])
        t = "—" if r["t"] is None else f"{r['t']:.2f} ({r['df']})"
        holm_cell = "—" if r["holm"] is None else ("yes" if r["holm"] else "no")
        b = r["boot"]
        boot = "—" if b is None else f"[{num(b['lo'])}, {num(b['hi'])}]"
        bp = "—" if b is None else fmt_p(b["p"])
        seeds = ",".join(map(str, r["seeds"]))
        rows.append(f"| {r['metric']} | {r['step']} | {r['a']} - {r['b']} | {seeds} | {diffs} | "
                    f"{num(r['mean'])} ± {se} | {t} | {fmt_p(r['p'])} | {verdict(r)} | {holm_cell} | "
                    f"{boot} | {bp} |")
    return rows


def header(n: int, n_tested: int, alpha: float = ALPHA) -> list[str]:
    return [f"Runs are paired by seed (same initial weights, same noise at every training step, same test "
            f"latents). Per pair of arms, metric and step: the per-seed differences a - b, their mean ± paired "
            f"standard error, and the {T_TEST}. A difference is called only from that test, at alpha = "
            f"{alpha:g} per comparison; there are {n} comparisons here ({n_tested} testable), so about "
            f"{alpha * n_tested:.1f} would pass by chance alone: `Holm` says whether one stays called under "
            f"Holm-Bonferroni correction over all {n_tested}. Bootstrap columns: the {BOOTSTRAP}, "
            f"{N_BOOT:,} resamples, percentile 95% interval and two-sided p, where per-image held-out losses "
            f"exist; with few seeds it is optimistic and never calls a difference by itself.", "",
            "| metric | step | arms (a - b) | seeds | per-seed a - b | mean ± SE | t (df) | p | verdict | Holm "
            "| bootstrap 95% | bootstrap p |", "|---|---:|---|---|---|---:|---:|---:|---|---|---:|---:|"]
