"""Convergence curves (eval/convergence.py) and the results/ rebuild (eval/tables.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from eval import convergence, tables
from rsprune.cli import UsageError, compose

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def write_curve(run_dir: Path, fds: dict[int, float]) -> Path:
    """A run folder whose checkpoints were rotated away but whose convergence.csv remains."""
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "fd": v, "kid": None, "kid_std": None, "n_fake": 500, "n_real": 500,
             "metric": "FD (EfficientNet-Lite2)", "sampler": "ddim", "steps": 50, "seed": 0, "key": "k"}
            for s, v in fds.items()]
    pd.DataFrame(rows)[convergence.COLUMNS].to_csv(run_dir / "convergence.csv", index=False)
    return run_dir


def test_report_from_saved_curves_gives_steps_to_target(tmp_path):
    full = write_curve(tmp_path / "full", {100: 90.0, 200: 60.0, 300: 41.0, 400: 35.0})
    pruned = write_curve(tmp_path / "rsprune85", {100: 70.0, 200: 39.0, 300: 33.0, 400: 31.0})
    out = tmp_path / "results"
    res = convergence.run(compose("eval/convergence", [f"runs=[{full},{pruned}]", f"results_dir={out}",
                                                       "target_fd=40"]))
    assert res["steps_to_target"] == {"full": 400, "rsprune85": 200}
    md = (out / "convergence.md").read_text()
    assert "| 300 | 41.00 | 33.00 |" in md and "| rsprune85 | 200 | 31.00 (400) |" in md
    assert "FD (EfficientNet-Lite2)" in md and "FID" not in md
    assert Image.open(out / "convergence.png").size[0] > 100
    # no target given: the worst final FD (35), which every run reaches
    res = convergence.run(compose("eval/convergence", [f"runs=[{full},{pruned}]", f"results_dir={out}"]))
    assert res["target_fd"] == 35.0 and res["steps_to_target"] == {"full": 400, "rsprune85": 300}


def test_bad_run_folders_are_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for runs, msg in ((f"[{tmp_path / 'empty'}]", "no checkpoint"), (f"[{tmp_path / 'absent'}]", "does not exist"),
                      ("[]", "no run folders")):
        with pytest.raises(UsageError, match=msg):
            convergence.run(compose("eval/convergence", [f"runs={runs}", f"results_dir={tmp_path}"]))


def test_tables_registry_runs_named_sections_and_skips_absent_modules(tmp_path):
    full = write_curve(tmp_path / "full", {10: 5.0, 20: 4.0})
    drop = ["~sections.pruning", "~sections.imbalanced", "~sections.ablation", "~sections.sr",
            "~sections.semantic_synthesis"]
    conv = [f"sections.convergence.set.runs=[{full}]", f"sections.convergence.set.results_dir={tmp_path / 'r'}"]
    res = tables.run(compose("eval/tables", drop + conv + ["+sections.later.fn=downstream.not_yet:section"]))
    assert res["done"] == ["convergence"] and "later" in res["skipped"]
    assert (tmp_path / "r" / "convergence.md").is_file()
    with pytest.raises(UsageError, match="section later"):
        tables.run(compose("eval/tables", ["section=later", "+sections.later.fn=downstream.not_yet:section"]))
    with pytest.raises(UsageError, match="unknown section"):
        tables.run(compose("eval/tables", ["section=nope"]))


def test_tables_cli_missing_run_folder_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "eval/tables.py", "convergence",
                        f"sections.convergence.set.runs=[{tmp_path / 'absent'}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.slow
def test_convergence_on_checkpoints_of_a_short_cpu_training_run(tmp_path):
    corpus = tmp_path / "corpus"
    for cls in ("Beach", "Forest", "Desert", "Farmland"):
        (corpus / cls).mkdir(parents=True)
        for f in sorted((DATA / "aid" / cls).iterdir())[:16]:
            (corpus / cls / f.name).symlink_to(f)
    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "train/main.py", "+experiment=cpu_small", "train.max_steps=4",
                            "train.checkpoint_every=2", "train.batch_size=4", f"data.corpus=[{corpus}]",
                            f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", "train.sample_every=0",
                            "data.holdout=16", "data.num_workers=0", "wandb.mode=disabled"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "results"
    args = [f"runs=[{run_dir}]", "real=holdout", "n_real=24", "n_samples=8", "steps=4", "batch_size=8",
            "resolution=64", "sheet_n=4", f"results_dir={out}", f"cache_dir={tmp_path / 'fid'}"]
    res = convergence.run(compose("eval/convergence", args))
    csv = pd.read_csv(run_dir / "convergence.csv")
    assert list(csv["step"]) == [2, 4] and (csv["fd"] > 0).all() and (csv["n_fake"] == 8).all()
    assert (csv["n_real"] == 24).all()  # held-out corpus images, re-derived from the run's config
    assert res["steps_to_target"]["run"] in (2, 4)
    assert (out / "convergence.md").is_file() and (out / "convergence.png").is_file()
    sheet = Image.open(out / "samples" / "run.png")
    assert sheet.size[0] > 8 * 64  # 4 generated + 4 real tiles of 64 px, side by side
    # rerun: every step is already scored under these settings, so nothing is regenerated
    before = (run_dir / "convergence.csv").read_text()
    convergence.run(compose("eval/convergence", args + ["sheet_n=0"]))
    assert (run_dir / "convergence.csv").read_text() == before
