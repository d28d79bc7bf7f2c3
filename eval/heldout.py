"""The held-out loss of training runs for the reports: the values logged in metrics.jsonl, the
per-image files of RUN/heldout/ (train/heldout.py) where a run kept them, and the training seed
that pairs runs of two arms.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rsprune import layout
from rsprune.cli import UsageError
from rsprune.errors import warn

HELDOUT = ["heldout_loss", "heldout_loss_balanced", "heldout_loss_worst_class", "heldout_loss_worst_class_name"]


def heldout_losses(run_dir: Path) -> pd.DataFrame:
    """One row per probed step: the held-out loss columns (HELDOUT) the run logged in metrics.jsonl
    (the last record of a step wins; a column it did not log is empty)."""
    out = {}
    for _, rec in layout.read_metrics(run_dir / layout.METRICS):  # a torn last line: warned, dropped
        if rec.get("heldout_loss") is not None:
            out[int(rec["step"])] = {k: rec.get(k) for k in HELDOUT}
    return pd.DataFrame([{"step": s, **v} for s, v in out.items()], columns=["step", *HELDOUT])


def per_image_losses(run_dir: Path) -> tuple[dict | None, dict[int, np.ndarray]]:
    """(index, step -> per-image loss (n_images,), the mean over timesteps) of RUN/heldout/ (train/heldout.py)."""
    from train.heldout import read_index, read_steps

    return read_index(run_dir), {s: a.astype(np.float64).mean(axis=1) for s, a in read_steps(run_dir).items()}


def check_pairing(indices: dict[str, dict]) -> dict | None:
    """The one index of every run's per-image files; UsageError if two runs' files hold other rows,
    timesteps or noise (their held-out losses, logged means included, do not compare)."""
    from train.heldout import PAIRING_KEYS

    if not indices:
        return None
    (first, ref), *rest = indices.items()
    for name, ix in rest:
        bad = [k for k in PAIRING_KEYS if ix.get(k) != ref.get(k)]
        if bad:
            raise UsageError(f"per-image held-out losses of {name} and {first} differ in {', '.join(bad)}: "
                             "their held-out losses do not compare (train them with the same eval.heldout_*)")
    return ref


def with_heldout_loss(rows: pd.DataFrame, run_dir: Path, per_image: dict | None = None,
                      classes: list[str] | None = None) -> pd.DataFrame:
    """The scored rows joined with the held-out loss at every step that has either: the logged
    values, replaced by those recomputed from per-image files (`per_image`: step -> (n_images,))."""
    from train.heldout import class_means

    loss = heldout_losses(run_dir).set_index("step")
    for step, v in (per_image or {}).items():
        means = class_means(v, classes)
        worst = max(means, key=means.get)
        logged = loss["heldout_loss"].get(int(step))
        if logged is not None and abs(float(logged) - float(v.mean())) > 1e-5 * abs(float(v.mean())):
            warn(f"{run_dir}: step {step} logged held-out loss {float(logged):.6g} but its per-image file "
                 f"averages {float(v.mean()):.6g}; the file's value is reported")
        loss.loc[int(step), HELDOUT] = [float(v.mean()), float(np.mean(list(means.values()))), means[worst], worst]
    loss = loss.reset_index().astype({"step": int})
    rows = rows.astype({"step": int})
    return rows.merge(loss, on="step", how="outer").sort_values("step").reset_index(drop=True)


def run_seed(run_dir: Path) -> int | None:
    """The run's training seed (config.yaml `seed`, else a `-s<seed>` folder suffix): what pairs runs of two arms."""
    conf = run_dir / layout.CONFIG
    seed = OmegaConf.load(conf).get("seed") if conf.is_file() else None
    if seed is None:
        m = re.search(r"-s(\d+)$", run_dir.name)
        seed = m.group(1) if m else None
    return None if seed is None else int(seed)
