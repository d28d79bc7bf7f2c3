"""Per-image held-out losses of a run, beside its metrics.jsonl:

    RUN/heldout/step_XXXXXXX.npy   float32 (n_images, n_timesteps), one row per test image (+ .sha256)
    RUN/heldout/index.json         the rows: test-split paths in row order and their class (the
                                   image's folder below the data root, e.g. aid/Industrial), the
                                   timesteps, the noise seed, sha256 of the path list

Every run of a comparison scores the same rows with the same timesteps and noise, so two runs'
files pair image by image (eval/paired.py): the index says whether they do. The summaries the
metrics log keeps are the natural mix (mean over every cell), the class-balanced mean (mean of
per-class means) and the worst class (highest class mean).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from rsprune import layout
from rsprune.cache import checksum_ok, read_json, save_npy, write_json
from rsprune.errors import UsageError, warn

# index.json keys that must agree for two files to pair row by row
PAIRING_KEYS = ("paths_sha256", "timesteps", "noise_seed", "prediction_type")


def class_of(path: str, root: str | None) -> str:
    """The class of a test image: its folder relative to the data root (`aid/Industrial`,
    `nwpu12/train/airplane`), or the folder's last two parts when it lies outside the root."""
    parent = Path(os.path.abspath(path)).parent
    if root:
        try:
            return parent.relative_to(Path(os.path.abspath(root))).as_posix()
        except ValueError:
            pass
    return "/".join(parent.parts[-2:])


def paths_sha256(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def make_index(paths: list[str], timesteps: list[int], seed: int, prediction_type: str,
               root: str | None = None, test_sha256: str | None = None) -> dict:
    return {"n_images": len(paths), "timesteps": [int(t) for t in timesteps], "noise_seed": int(seed),
            "prediction_type": str(prediction_type), "paths_sha256": paths_sha256(paths),
            "test_sha256": test_sha256, "root": root, "paths": list(paths),
            "classes": [class_of(p, root) for p in paths]}


def write_index(run_dir, index: dict) -> None:
    """Write RUN/heldout/index.json; refuse (UsageError) a run folder whose files hold other rows,
    timesteps or noise: the steps already written would not pair with the new ones."""
    path = Path(run_dir) / layout.HELDOUT / layout.HELDOUT_INDEX
    if path.is_file():
        old = read_json(path)
        bad = [k for k in PAIRING_KEYS if old.get(k) != index.get(k)]
        if not bad:
            return
        raise UsageError(f"{path.parent} holds per-image held-out losses of another probe ({', '.join(bad)} "
                         "differ): rerun with the run's eval.heldout_* values or choose another run_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, index)


def save_step(run_dir, step: int, losses: np.ndarray) -> Path:
    path = layout.heldout_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, np.asarray(losses, np.float32), checksum=True)
    return path


def summary(losses: np.ndarray, classes: list[str] | None) -> dict:
    """Natural-mix, class-balanced and worst-class held-out loss of one (n_images, n_timesteps) array."""
    per_image = np.asarray(losses, np.float64).mean(axis=1)
    out = {"heldout_loss": float(per_image.mean())}
    if classes is not None:
        means = class_means(per_image, classes)
        worst = max(means, key=means.get)
        out |= {"heldout_loss_balanced": float(np.mean(list(means.values()))),
                "heldout_loss_worst_class": means[worst], "heldout_loss_worst_class_name": worst,
                "heldout_classes": len(means)}
    return out


def class_means(per_image: np.ndarray, classes: list[str]) -> dict[str, float]:
    """class -> mean of its images' values (classes in sorted order)."""
    labels = np.asarray(classes)
    return {str(c): float(np.mean(per_image[labels == c])) for c in np.unique(labels)}


def read_index(run_dir) -> dict | None:
    path = Path(run_dir) / layout.HELDOUT / layout.HELDOUT_INDEX
    return read_json(path) if path.is_file() else None


def read_steps(run_dir) -> dict[int, np.ndarray]:
    """step -> per-image losses of every verified file of a run (a damaged or unverifiable file is
    warned about and left out, never removed); {} for a run without them."""
    index, out = read_index(run_dir), {}
    folder = Path(run_dir) / layout.HELDOUT
    if index is None:
        return out
    for f in sorted(folder.glob("step_*.npy")):
        step = layout.parse_step(f.stem)
        if step is None:
            continue
        if not checksum_ok(f):
            warn(f"{f} does not match its checksum (or has none): left out")
            continue
        a = np.load(f)
        if a.shape != (index["n_images"], len(index["timesteps"])):
            raise UsageError(f"{f} has shape {a.shape}; {folder / layout.HELDOUT_INDEX} says "
                             f"({index['n_images']}, {len(index['timesteps'])})")
        out[step] = a
    return out
