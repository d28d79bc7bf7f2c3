"""One run per run folder (the lock), the values training checks before it writes anything, and
the config.yaml a run folder holds only once it trained: real AID images, tiny UNet, real CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT as REPO
from conftest import aid_paths, tiny_overrides, write_kept

from rsprune.cli import UsageError, compose

FAST = {"train.sample_every": 0, "train.snapshot_steps": "[]"}
HOLD = ("import sys, time\nfrom rsprune import runlock\n"
        "with runlock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return root, write_kept(root / "prune", aid_paths(16, offset=3)), root / "cache"


def _run(overrides):
    from train.main import run

    return run(compose("train", overrides))


def _train_cli(overrides, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "train/main.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture
def holder(tmp_path):
    """Start another process holding a folder's lock; it is killed (-9) at the end."""
    procs = []

    def start(run_dir):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_run_in_a_held_folder_exits_2_naming_the_holder(base, holder):
    root, kept, cache = base
    run_dir = root / "shared"
    first = holder(run_dir)  # what the first of two identical commands holds while it trains
    r = _train_cli(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"(pid {first.pid})" in lines[0], r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no split.json, config, metrics or checkpoint
    # A holder that dies, even by kill -9, frees the folder: its lock file left behind blocks nothing.
    first.kill()
    first.wait()
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    assert out["step"] == 1 and (run_dir / "config.yaml").is_file()


def test_prune_and_fine_tune_hold_their_run_folders_too(base, holder, tmp_path):
    from downstream import sr
    from prune.run import run as prune

    root, kept, cache = base
    held = holder(tmp_path / "prune-run")
    with pytest.raises(UsageError, match=rf"prune-run is in use by another run \(pid {held.pid}\)"):
        prune(compose("prune", [f"data.corpus=[{kept}]", f"run_dir={tmp_path / 'prune-run'}",
                                f"cache_dir={cache}", "method=random", "index.num_workers=0"]), progress=False)
    held = holder(tmp_path / "sr-run")
    with pytest.raises(UsageError, match=rf"sr-run is in use by another run \(pid {held.pid}\)"):
        sr.run(compose("downstream/sr", ["backbone=none", f"run_dir={tmp_path / 'sr-run'}", f"cache_dir={cache}",
                                         f"sr.train={kept}", "sr.max_train=4"]))
    assert not (tmp_path / "prune-run" / "kept.txt").exists() and not (tmp_path / "sr-run" / "metrics.json").exists()


@pytest.mark.slow
def test_two_processes_refuse_a_held_folder_alike(base, holder):
    """Under accelerate launch the main process locks and every process exits 2 with the same line."""
    from test_train_accelerate import _launch

    root, kept, cache = base
    run_dir = root / "held-ddp"
    first = holder(run_dir)
    r = _launch(2, tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    assert r.returncode != 0
    assert r.stderr.count(f"error: {run_dir} is in use by another run (pid {first.pid})") >= 2, r.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


BAD_VALUES = [("seed", "-1"), ("data.resolution", "0"), ("data.resolution", "-8"), ("data.resolution", "12"),
              ("optim.lr", "nan"), ("optim.lr", "0"), ("optim.betas", "[0.9]"), ("train.ema.decay", "2"),
              ("train.snapshot_steps", "[0,5]"), ("eval.heldout_timesteps", "0"), ("data.holdout", "0"),
              ("scheduler.num_train_timesteps", "1"), ("train.mixed_precision", "fp8"), ("optim.warmup_steps", "-1"),
              ("train.max_grad_norm", "inf"), ("data.num_workers", "1.5")]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_training_values_are_refused_before_anything_is_written(base, tmp_path, key, value):
    root, kept, cache = base
    run_dir = tmp_path / "run"
    with pytest.raises(UsageError, match=rf"^{key.replace('.', '[.]')}"):
        _run(tiny_overrides(kept, run_dir, cache, **{**FAST, key: value}))
    assert not run_dir.exists()  # split.json, config.yaml, the lock: nothing


def test_bad_value_on_the_command_line_is_one_line(base, tmp_path):
    root, kept, cache = base
    r = _train_cli(tiny_overrides(kept, tmp_path / "run", tmp_path / "cache", **{"seed": -1}))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: seed must be >= 0 and <= 4294967295; got -1"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no split drawn either


def test_a_failed_bad_lr_leaves_a_folder_a_good_lr_may_use(base, tmp_path):
    root, kept, cache = base
    run_dir = tmp_path / "run"
    with pytest.raises(UsageError, match="optim.lr"):
        _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1, "optim.lr": "nan"}))
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1, "optim.lr": 1e-3}))
    assert out["step"] == 1 and "lr: 0.001" in (run_dir / "config.yaml").read_text()


def test_a_crash_in_the_first_step_leaves_no_config_to_refuse(base, tmp_path):
    """config.yaml appears with the first trained step: a run that crashed before (here a batch of
    the wrong shape) does not lock the folder to its config."""
    from train import engine, setup

    root, kept, cache = base
    run_dir = tmp_path / "run"
    cfg = compose("train", tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    acc = engine.accelerator(cfg)
    unet = setup.build_unet(cfg.unet, 32, 4)
    job = engine.Job(unet, setup.build_noise_scheduler(cfg.scheduler), None, 16,
                     batch=lambda idx, gen: (torch.zeros(len(idx), 3, 4, 4), None))  # 3 channels, not 32
    with pytest.raises(RuntimeError):
        engine.fit(acc, cfg, job, run_dir)
    assert not (run_dir / "config.yaml").exists()
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1, "train.batch_size": 2}))
    assert out["step"] == 1 and "batch_size: 2" in (run_dir / "config.yaml").read_text()


@pytest.fixture(scope="module")
def trained(base):
    """A 1-step run with its checkpoint: copied by the tests that damage its config.yaml."""
    root, kept, cache = base
    _run(tiny_overrides(kept, root / "trained", cache, **FAST, **{"train.max_steps": 1}))
    return root / "trained"


DAMAGED = {"malformed": "seed: [\n", "list": "- 1\n- 2\n", "empty": "", "binary": "\x00\xff"}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_unreadable_config_of_a_trained_folder_is_one_line(base, trained, tmp_path, damage):
    root, kept, cache = base
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "config.yaml").write_text(DAMAGED[damage])
    with pytest.raises(UsageError, match=r"config\.yaml is not a readable run config .* holds trained steps"):
        _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 2}))
    assert (run_dir / "config.yaml").read_text() == DAMAGED[damage]  # left for the user to restore
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000001"]


@pytest.mark.parametrize("damage", ["malformed", "list"])
def test_unreadable_config_of_a_folder_that_never_trained_is_replaced(base, tmp_path, capfd, damage):
    root, kept, cache = base
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(DAMAGED[damage])
    capfd.readouterr()
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    assert "warning: " in capfd.readouterr().err
    assert out["step"] == 1 and "max_steps: 1" in (run_dir / "config.yaml").read_text()



def test_an_unwritable_run_dir_is_refused_before_any_work(base, tmp_path):
    """A 300-character folder name (over the filesystem's 255) and a run_dir below a file: one
    line, nothing written, not even the latent cache."""
    root, kept, cache = base
    (tmp_path / "afile").write_text("x")
    fresh = tmp_path / "fresh-cache"
    for run_dir in (tmp_path / ("r" * 300), tmp_path / "afile" / "run"):
        with pytest.raises(UsageError, match="run_dir="):
            _run(tiny_overrides(kept, run_dir, fresh, **FAST, **{"train.max_steps": 1}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_bad_value_is_refused_before_the_default_split_is_drawn(tmp_path):
    """With the default data the split is drawn (and cached) when the config resolves; a bad value
    must not cost that, nor leave a split in a cache the user did not mean to fill."""
    r = _train_cli(["seed=-1", f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                    f"data.split.dir={tmp_path / 'splits'}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: seed must be >= 0 and <= 4294967295; got -1"], r.stderr[-1000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, cache or split
