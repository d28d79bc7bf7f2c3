"""Shared helpers for the training tests: a few dozen real AID images and the real configs, shrunk."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSPRUNE_DATA", REPO / ".." / "shared" / "data")).resolve()
TAEF2_DIR = DATA.parent / "models" / "taef2"


def aid_paths(n: int, offset: int = 0) -> list[str]:
    """n AID images spread over the classes (every k-th file of the sorted list)."""
    files = sorted(str(p) for p in (DATA / "aid").rglob("*.jpg"))
    step = max(len(files) // (n + offset), 1)
    return files[offset::step][:n]


def write_kept(folder: Path, paths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / "kept.txt"
    kept.write_text("".join(p + "\n" for p in paths))
    return kept


def test_list(kept: Path, n: int = 8) -> Path:
    """A list file of n real AID images outside `kept`: the run's test split (held-out set, probes)."""
    listed = kept / "kept.txt" if kept.is_dir() else kept
    taken = set(listed.read_text().split()) if listed.is_file() else set()
    path = Path(str(kept).rstrip("/") + "-test.txt")  # beside it: also for a kept.txt that does not exist
    path.write_text("".join(p + "\n" for p in [p for p in aid_paths(2 * n, offset=7) if p not in taken][:n]))
    return path


def tiny_overrides(kept: Path, run_dir: Path, cache: Path, **extra) -> list[str]:
    """cpu_small with a tiny UNet, 32 px images, a few steps; everything written under tmp."""
    over = {
        "data.subset": str(kept), "run_dir": str(run_dir), "cache_dir": str(cache),
        "data.resolution": 32, "data.holdout": 4, "data.num_workers": 0, "unet": "tiny",
        "data.test": str(test_list(kept)), "data.scale_images": 32, "eval.heldout_n": 8,
        "train.batch_size": 4, "train.max_steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.sample_every": 3, "train.sample_n": 4, "train.sample_steps": 3, "wandb.mode": "disabled",
        "optim.warmup_steps": 2, "train.cpu_threads": 1, "optim.decay_steps": 6,
        "data.corpus": f"[{DATA / 'aid'}]", "autoencoder.path": str(TAEF2_DIR),
    }
    over.update(extra)
    over = {k: v for k, v in over.items() if v is not None}  # None drops a key (other autoencoder kinds)
    return ["+experiment=cpu_small"] + [f"{k}={v}" for k, v in over.items()]
