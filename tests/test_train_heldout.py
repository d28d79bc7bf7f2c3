"""Per-image held-out losses of shrunk real runs: one row per test image at every probed step,
the logged summaries recomputed from them, the same rows for every seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import aid_paths, tiny_overrides, write_kept

from rsprune.cache import checksum_ok
from rsprune.cli import UsageError, compose

SHRUNK = {"train.max_steps": 4, "train.checkpoint_every": 4, "train.snapshot_steps": "[2]",
          "train.sample_every": 0, "eval.heldout_n": "all"}


def _run(overrides):
    from train.main import run

    return run(compose("train", overrides))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    kept, cache = write_kept(root / "prune", aid_paths(16, offset=3)), root / "cache"
    runs = []
    for seed in (0, 1):
        run_dir = root / f"s{seed}"
        _run(tiny_overrides(kept, run_dir, cache, seed=seed, **SHRUNK))
        runs.append(run_dir)
    return root, kept, cache, runs


def _records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_probed_step_writes_one_row_per_test_image(two_seeds):
    from train.heldout import class_means, read_index, read_steps

    _, kept, _, runs = two_seeds
    test = (kept.parent / "kept.txt-test.txt").read_text().split()
    for run_dir in runs:
        index, steps = read_index(run_dir), read_steps(run_dir)
        probed = {r["step"]: r for r in _records(run_dir) if "heldout_loss" in r}
        assert sorted(steps) == sorted(probed) == [2, 4]  # the snapshot and the checkpoint step
        assert index["paths"] == sorted(test) and index["n_images"] == len(test) == 8  # the whole split
        assert index["timesteps"] == [62, 187, 312, 437, 562, 687, 812, 937] and index["noise_seed"] == 0
        assert all(c.startswith("aid/") for c in index["classes"]) and len(set(index["classes"])) > 2
        for step, losses in steps.items():
            assert losses.shape == (8, 8) and losses.dtype == np.float32 and (losses > 0).all()
            assert checksum_ok(run_dir / "heldout" / f"step_{step:07d}.npy")
            rec = probed[step]
            assert rec["heldout_n"] == 8
            assert losses.astype(np.float64).mean() == pytest.approx(rec["heldout_loss"], rel=1e-6)
            per_t = losses.astype(np.float64).mean(axis=0)
            assert list(rec["heldout_loss_t"].values()) == pytest.approx(list(per_t), rel=1e-6)
            means = class_means(losses.mean(axis=1), index["classes"])
            assert rec["heldout_loss_balanced"] == pytest.approx(np.mean(list(means.values())), rel=1e-6)
            assert rec["heldout_loss_worst_class"] == pytest.approx(max(means.values()), rel=1e-6)
            assert rec["heldout_loss_worst_class_name"] == max(means, key=means.get)


def test_seeds_share_rows_timesteps_and_noise_but_not_losses(two_seeds):
    from train.heldout import PAIRING_KEYS, read_index, read_steps

    runs = two_seeds[3]
    a, b = (read_index(r) for r in runs)
    assert a["paths"] == b["paths"] and a["classes"] == b["classes"]
    assert all(a[k] == b[k] for k in PAIRING_KEYS)
    la, lb = (read_steps(r)[4] for r in runs)
    assert not np.array_equal(la, lb)  # other initial weights: other losses, image by image
    # Paired by image: the two seeds' per-image losses agree far better than shuffled rows would.
    r = np.corrcoef(la.mean(axis=1), lb.mean(axis=1))[0, 1]
    assert r > 0.5, r


def test_a_rerun_with_another_probe_is_refused_and_bad_sizes_are_usage_errors(two_seeds):
    root, kept, cache, runs = two_seeds
    with pytest.raises(UsageError, match="another probe"):
        _run(tiny_overrides(kept, runs[0], cache, **SHRUNK | {"train.max_steps": 5, "eval.heldout_timesteps": 4}))
    with pytest.raises(UsageError, match="eval.heldout_n"):
        _run(tiny_overrides(kept, root / "bad", cache, **SHRUNK | {"eval.heldout_n": 0}))
