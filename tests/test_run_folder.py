"""One run per run folder: a second training run started into a folder in use exits 2 naming the
holder's pid, before it writes anything; the folder is free again once the holder ends."""
from __future__ import annotations

import os

import pytest
from conftest import aid_paths, tiny_overrides, write_kept

from rsprune import layout
from rsprune.cli import UsageError, compose
from train.main import run


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_folder_frees(tmp_path):
    kept = write_kept(tmp_path / "prune", aid_paths(12))
    run_dir = tmp_path / "run"
    cfg = compose("train", tiny_overrides(kept, run_dir, tmp_path / "cache", **{
        "train.max_steps": 2, "train.sample_every": 0, "train.snapshot_steps": "[]"}))
    holder = layout.RunLock(run_dir)  # another run holds it (flock is per open file: same process works)
    with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        run(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == [layout.LOCK]  # nothing written
    holder.release()
    assert run(cfg)["step"] == 2
    layout.RunLock(run_dir).release()  # and the finished run let it go


@pytest.mark.parametrize("bad, match", [
    ("seed=-1", "seed must be >= 0"), ("data.resolution=0", "data.resolution must be >= 8"),
    ("data.resolution=-8", "data.resolution must be >= 8"), ("data.resolution=12", "must be a multiple of 8"), ("optim.lr=nan", "optim.lr must be a number"),
    ("optim.schedule=linear", "optim.schedule must be one of constant, cosine"),
])
def test_bad_training_values_are_refused_before_anything_is_written(tmp_path, bad, match):
    kept = write_kept(tmp_path / "prune", aid_paths(12))
    run_dir = tmp_path / "run"
    cfg = compose("train", tiny_overrides(kept, run_dir, tmp_path / "cache") + [bad])
    with pytest.raises(UsageError, match=match):
        run(cfg)
    assert not run_dir.exists() and not (tmp_path / "cache").exists()  # no split.json, no latents
