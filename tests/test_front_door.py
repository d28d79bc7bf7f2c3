"""What a newcomer meets: a user's evaluation writes beside the user's runs, never into results/."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_convergence import write_curve

from rsprune.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_evaluation_leaves_results_untouched(tmp_path):
    before = tree_digest(ROOT / "results")
    runs = [write_curve(tmp_path / "runs" / f"mine-s{i}", {250: 80.0 + i, 500: 60.0 + i}) for i in (0, 1)]
    work = tmp_path / "checkout"  # the user's working directory: run as the README shows, no results_dir=
    work.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "convergence.py"), f"runs=[{runs[0]},{runs[1]}]"],
                       cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (work / "outputs" / "eval" / "convergence.md").is_file()
    assert (work / "outputs" / "eval" / "convergence.png").is_file()
    assert not (work / "results").exists()
    assert tree_digest(ROOT / "results") == before


def test_sample_command_writes_n_ema_samples_that_fid_reads(tiny_run, tmp_path):
    from eval.fid import run as fid
    from rsprune.cli import compose
    from train.generate import generate
    from train.sample import run

    out = tmp_path / "samples"
    cfg = compose("sample", [f"run={tiny_run}", "n=5", f"out={out}", "steps=3", "batch_size=2"])
    info = run(cfg)
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)] and info["step"] == 6
    # the same images the evaluation's sampler gives for that seed: EMA weights, latest step
    want = generate(str(tiny_run), 5, seed=0, steps=3, batch_size=2)
    got = np.stack([np.asarray(Image.open(f)) for f in files])
    assert np.array_equal(got, want)
    stamp = [f.stat().st_mtime_ns for f in files]
    run(cfg)  # rerun: a complete folder is kept
    assert [f.stat().st_mtime_ns for f in files] == stamp
    with pytest.raises(UsageError, match="holds other samples"):
        run(compose("sample", [f"run={tiny_run}", "n=5", f"out={out}", "steps=4"]))
    r = fid(compose("eval/fid", [f"real={out}", f"fake={out}", "kid=false", f"cache_dir={tmp_path / 'fid'}",
                                 "warn_below=0"]))
    assert abs(r["fd"]) < 1e-3  # a folder against itself


def test_help_names_the_commands_own_groups_keys_and_choices():
    from rsprune.cli import help_text

    prune = help_text("prune", "", "run.py")
    assert "method: density | entropy |" in prune and "rsprune" in prune and "+experiment: ratio50" in prune
    assert "ratio: 0.85" in prune and "selection:" in prune and "autoencoder" not in prune and "cpu_small" not in prune
    train = help_text("train", "", "main.py")
    assert "unet: paper | small | tiny" in train and "autoencoder: kl_small | sd_vae | taef2" in train
    assert "+experiment: cpu_small | paper_gpu | repro_cpu" in train and "ratio85" not in train
    p = subprocess.run([sys.executable, "eval/convergence.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "results_dir: outputs/eval" in p.stdout and "+experiment" not in p.stdout


def test_a_missing_absolute_corpus_is_named_without_the_data_root_hint(tmp_path):
    p = subprocess.run([sys.executable, "prune/run.py", "data.corpus=[/nonexistent]", f"cache_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "/nonexistent does not exist" in p.stderr and "data.root" not in p.stderr
