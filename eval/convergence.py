"""Convergence curves: Fréchet distance of each checkpoint's samples against held-out real images.

    python eval/convergence.py runs=[outputs/train/full,outputs/train/rsprune85] [n_samples=1000 steps=50 ...]

For every run and every checkpoint (train.generate.list_checkpoints) it generates `n_samples`
images from the EMA weights with a fixed seed and sampler (DDIM, `steps` steps), and scores them
against real images in the feature space `feature` (eval/features.py: antialiased bicubic resize
to the extractor's size; real images are first brought to the run's image size, as training
saw them). Real images: `real=holdout` re-derives each run's own held-out corpus images (never
trained on; `n_real` of them) from its config.yaml; `real=DIR` uses one folder for every run,
which is what to use when runs trained on different subsets must share one yardstick.

Writes `<run>/convergence.csv` (one row per step; rerunning skips steps already scored under
the same settings, so it can follow a run that is still training), `<results_dir>/convergence.md`
(FD at each step, steps to reach a target FD), `<results_dir>/convergence.png` (FD against step,
one line per run) and `<results_dir>/samples/<run>.png` (last checkpoint's samples beside real
images). Keep old checkpoints (train.checkpoints_total_limit) if every step should be scored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rsprune.cache import atomic_path, stable_hash, write_text
from rsprune.cli import UsageError, main

from rsprune.features import build_extractor, extract_features, metric_label, reference_stats, warn
from eval.fid import encoder_overrides, image_paths
from rsprune.frechet import check_count, fd_kid
from eval.sheets import sample_sheet

COLUMNS = ["step", "fd", "kid", "kid_std", "n_fake", "n_real", "metric", "sampler", "steps", "seed", "key"]


def run_dirs(cfg) -> list[Path]:
    """The run folders of `cfg.runs`, each checked to exist and hold at least one checkpoint."""
    from train.generate import list_checkpoints

    runs = [Path(str(r)) for r in (cfg.runs or [])]
    if not runs:
        raise UsageError("no run folders given: runs=[RUN_DIR,...]")
    for r in runs:
        if not r.is_dir():
            raise UsageError(f"run folder {r} does not exist")
        if not list_checkpoints(r) and not (r / "convergence.csv").is_file():
            raise UsageError(f"no checkpoint in {r / 'checkpoints'} (and no convergence.csv to report)")
    return runs


def run_names(runs: list[Path]) -> list[str]:
    """Short unique labels: the folder name, or parent/name where names clash."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def real_paths(cfg, run_dir: Path) -> list[str]:
    """Real reference images for one run: a folder, or the run's own held-out corpus images."""
    if str(cfg.real) != "holdout":
        return image_paths(cfg.real, "real")
    from train.data import resolve_subset

    conf = run_dir / "config.yaml"
    if not conf.is_file():
        raise UsageError(f"real=holdout needs {conf} (written by train/main.py); or give real=DIR")
    tcfg = OmegaConf.load(conf)
    tcfg.data.holdout = int(cfg.n_real)
    return resolve_subset(tcfg.data, int(tcfg.seed))[1]


def read_rows(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "convergence.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)


def score_run(cfg, run_dir: Path, extractor, results_dir: Path, name: str) -> pd.DataFrame:
    """Score every unscored checkpoint of one run; returns its rows scored under these settings.

    `extractor` is a function returning the feature module (built once per process)."""
    from train.generate import generate, list_checkpoints, load_backbone

    ckpts = list_checkpoints(run_dir)
    rows = read_rows(run_dir)
    if not ckpts:  # checkpoints rotated away: report what the CSV holds
        return rows
    image_size = checkpoint_image_size(ckpts[-1][1])
    extractor = extractor()
    ref = reference(cfg, run_dir, extractor, image_size)
    key = stable_hash(ref["key"], int(cfg.n_samples), int(cfg.seed), str(cfg.sampler), int(cfg.steps), bool(cfg.kid))
    done = set(rows.loc[rows["key"] == key, "step"].astype(int))
    for step, _ in ckpts:
        if step in done:
            continue
        loaded = load_backbone(run_dir, step=step, ema=True, device=device(cfg))
        fake = generate(loaded, int(cfg.n_samples), seed=int(cfg.seed), steps=int(cfg.steps),
                        sampler=str(cfg.sampler), batch_size=int(cfg.batch_size))
        ff, _ = extract_features(fake, extractor, int(cfg.batch_size))
        res = fd_kid(ref["features"], ff, kid=bool(cfg.kid), kid_subsets=int(cfg.kid_subsets),
                     kid_subset_size=int(cfg.kid_subset_size), seed=int(cfg.seed))
        row = {"step": step, "fd": res["fd"], "kid": res["kid"], "kid_std": res["kid_std"], "n_fake": len(ff),
               "n_real": ref["n"], "metric": metric_label(extractor.name), "sampler": str(cfg.sampler),
               "steps": int(cfg.steps), "seed": int(cfg.seed), "key": key}
        rows = pd.concat([rows[rows["step"] != step], pd.DataFrame([row])]) if len(rows) else pd.DataFrame([row])
        rows = rows.sort_values("step", kind="stable")[COLUMNS].reset_index(drop=True)
        with atomic_path(run_dir / "convergence.csv") as tmp:  # after every step: a killed run resumes here
            rows.to_csv(tmp, index=False)
        kid = f" kid={res['kid']:.4g}" if res["kid"] is not None else ""
        print(f"{name} step {step}: fd={res['fd']:.6g}{kid}")
    if int(cfg.sheet_n) > 0:
        write_sheet(cfg, run_dir, ckpts[-1][0], image_size, results_dir, name)
    return rows[rows["key"] == key]


def write_sheet(cfg, run_dir: Path, step: int, image_size: int, results_dir: Path, name: str) -> Path:
    """`sheet_n` samples of the last checkpoint (same seed and sampler) beside as many real images."""
    from train.generate import generate, load_backbone

    n = int(cfg.sheet_n)
    fake = generate(load_backbone(run_dir, step=step, ema=True, device=device(cfg)), n, seed=int(cfg.seed),
                    steps=int(cfg.steps), sampler=str(cfg.sampler), batch_size=int(cfg.batch_size))
    paths = real_paths(cfg, run_dir)
    real = real_images(paths[:: max(1, len(paths) // n)][:n], image_size)  # spread over the sorted classes
    path = results_dir / "samples" / f"{name.replace('/', '_')}.png"
    sample_sheet(fake, real, path, captions=(f"generated, step {step}", "real"))
    return path


def checkpoint_image_size(ckpt: Path) -> int:
    """Generated image side of a checkpoint, from its saved configs (no weights loaded)."""
    from rsprune.cache import read_json

    unet = read_json(ckpt / ("unet_ema" if (ckpt / "unet_ema").is_dir() else "unet") / "config.json")
    return int(unet["sample_size"]) * int(read_json(ckpt / "first_stage.json")["downscale"])


def reference(cfg, run_dir: Path, extractor, image_size: int) -> dict:
    paths = real_paths(cfg, run_dir)
    pre = image_size if cfg.real_at_train_resolution else None
    ref = reference_stats(paths, extractor, cfg.cache_dir, batch_size=int(cfg.batch_size),
                          num_workers=int(cfg.num_workers), pre_size=pre)
    if ref["n_unreadable"]:
        warn(f"real: {ref['n_unreadable']} unreadable image(s) skipped")
    check_count(ref["n"], f"real ({cfg.real})", int(cfg.warn_below))
    check_count(int(cfg.n_samples), "n_samples", int(cfg.warn_below))
    return ref


def real_images(paths, size: int) -> np.ndarray:
    from rsprune.imageio import UnreadableImage, load_rgb, resize

    out = []
    for p in paths:
        try:
            out.append(resize(load_rgb(p), size))
        except UnreadableImage:
            continue
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def device(cfg) -> str:
    import torch

    return str(cfg.device) if cfg.get("device") else ("cuda" if torch.cuda.is_available() else "cpu")


def steps_to_reach(rows: pd.DataFrame, target: float) -> int | None:
    """First checkpoint step whose FD is at or under `target` (None if never)."""
    hit = rows[rows["fd"] <= target]
    return int(hit["step"].min()) if len(hit) else None


def default_target(curves: dict[str, pd.DataFrame]) -> float | None:
    """The worst final FD among runs: a level every run reaches, so the steps compare speed."""
    finals = [c.sort_values("step")["fd"].iloc[-1] for c in curves.values() if len(c)]
    return float(max(finals)) if finals else None


def markdown(curves: dict[str, pd.DataFrame], metric: str, target: float | None, cfg) -> str:
    """FD at each step (one column per run) and steps to reach the target FD."""
    steps = sorted({int(s) for c in curves.values() for s in c["step"]})
    names = list(curves)
    lines = [f"# Convergence: {metric} of samples against held-out real images", "",
             f"{cfg.n_samples} samples per checkpoint from EMA weights, {str(cfg.sampler).upper()} {cfg.steps} steps, "
             f"seed {cfg.seed}; real images: {cfg.real}. Rebuilt by `python eval/convergence.py` "
             "(or `python eval/tables.py convergence`).", "",
             "| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for s in steps:
        cells = []
        for n in names:
            v = curves[n].loc[curves[n]["step"] == s, "fd"]
            cells.append(f"{float(v.iloc[0]):.2f}" if len(v) else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if target is not None:
        how = "given" if cfg.get("target_fd") is not None else "the worst final FD among runs"
        lines += ["", f"Steps to reach {metric} <= {target:.2f} ({how}):", "", "| run | steps | best FD (step) |",
                  "|---|---:|---:|"]
        for n, c in curves.items():
            reach = steps_to_reach(c, target)
            best = c.iloc[int(np.argmin(c["fd"].to_numpy()))] if len(c) else None
            best_txt = f"{best['fd']:.2f} ({int(best['step'])})" if best is not None else ""
            lines.append(f"| {n} | {reach if reach is not None else 'not reached'} | {best_txt} |")
    return "\n".join(lines) + "\n"


def figure(curves: dict[str, pd.DataFrame], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        c = c.sort_values("step")
        ax.plot(c["step"], c["fd"], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> dict:
    """Score every run's checkpoints, then write the table and the figure."""
    runs = run_dirs(cfg)
    results_dir = Path(str(cfg.results_dir))
    def extractor():  # built only when a checkpoint needs scoring (a report from CSVs needs none)
        return build_extractor(cfg.feature, inception_weights=cfg.get("inception_weights"),
                               overrides=encoder_overrides(cfg), device=cfg.get("device"))

    metric = metric_label(str(cfg.feature))
    curves = {name: score_run(cfg, r, extractor, results_dir, name) for r, name in zip(runs, run_names(runs))}
    target = float(cfg.target_fd) if cfg.get("target_fd") is not None else default_target(curves)
    write_text(results_dir / "convergence.md", markdown(curves, metric, target, cfg))
    figure(curves, metric, results_dir / "convergence.png")
    print(f"wrote {results_dir / 'convergence.md'} and {results_dir / 'convergence.png'}")
    return {"curves": {n: c[["step", "fd", "kid"]].to_dict("records") for n, c in curves.items()},
            "target_fd": target, "steps_to_target": {n: steps_to_reach(c, target) if target is not None else None
                                                     for n, c in curves.items()}}


section = run  # the `convergence` section of eval/tables.py


if __name__ == "__main__":
    main("eval/convergence", run, __doc__)
