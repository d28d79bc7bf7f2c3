"""`accelerate launch train/main.py` on CPU: 2 processes (gloo) and 1 process, checkpoint, resume."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT as REPO, aid_paths, tiny_overrides, write_kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, overrides: list[str]) -> subprocess.CompletedProcess:
    # Two CPU processes go through torchrun (accelerate's --multi_gpu launcher); without CUDA,
    # or with ACCELERATE_USE_CPU=1, accelerate then runs them as MULTI_CPU with gloo.
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "train/main.py", *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _steps(run_dir):
    """Steps of the step-0 record and the loss records (probe records share their step)."""
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r or r["step"] == 0]


@pytest.mark.parametrize("num_processes", [pytest.param(2, marks=pytest.mark.slow), 1])
def test_accelerate_launch_trains_checkpoints_and_resumes(tmp_path, num_processes):
    kept = write_kept(tmp_path / "prune", aid_paths(16))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    over = tiny_overrides(kept, run_dir, cache, **{"train.max_steps": 2, "train.checkpoint_every": 2,
                                                    "train.sample_every": 2})
    first = _launch(num_processes, over)
    assert first.returncode == 0, first.stderr[-3000:]
    ck = run_dir / "checkpoints/step_0000002"
    # the main process published one state, safetensors + JSON only (no per-process RNG pickles)
    assert {p.suffix for p in ck.rglob("*") if p.is_file()} == {".json", ".safetensors"}
    assert (ck / "unet_ema").is_dir() and (run_dir / "samples/step_0000002.png").is_file()
    meta = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert meta["epoch"] == pytest.approx(4 * num_processes / 16)  # global batch = 4 x processes

    # Rerunning the same command with more steps resumes from step 2 instead of starting over.
    again = _launch(num_processes, over + ["train.max_steps=4"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr
    assert _steps(run_dir) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_usage_error_exits_2_with_one_line(tmp_path):
    over = tiny_overrides(tmp_path / "missing.txt", tmp_path / "run", tmp_path / "cache")
    r = subprocess.run([sys.executable, "train/main.py", *over], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: subset file")


def test_rerun_in_a_run_dir_of_another_config_exits_2(tmp_path):
    """The command line refuses a run folder holding another run, in one line, before any work."""
    from omegaconf import OmegaConf

    from rsprune.cli import compose

    kept = write_kept(tmp_path / "prune", aid_paths(8))
    run_dir = tmp_path / "run"
    over = tiny_overrides(kept, run_dir, tmp_path / "cache")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose("train", over + ["train.batch_size=2"])))
    r = subprocess.run([sys.executable, "train/main.py", *over], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "train.batch_size: 2 -> 4" in last
    assert not (tmp_path / "cache").exists()  # refused before encoding anything
