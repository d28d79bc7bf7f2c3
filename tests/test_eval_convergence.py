"""Convergence curves (eval/convergence.py) and the results/ rebuild (eval/tables.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from conftest import DATA
from PIL import Image

from eval import convergence, tables
from rsprune.cli import UsageError, compose

ROOT = Path(__file__).resolve().parents[1]


SETTINGS = {"metric": "FD (EfficientNet-Lite2)", "side": 64, "n_fake": 1000, "sampler": "ddim", "steps": 50,
            "seed": 0, "test_sha256": "a" * 64}


def write_curve(run_dir: Path, fds: dict[int, float], losses: dict[int, float] | None = None, **settings) -> Path:
    """A run folder whose snapshots were rotated away but whose convergence.csv (and log) remain."""
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "fd": v, "kid": v / 1e4, "kid_std": 1e-4, "fd_balanced": v + 1, "kid_balanced": v / 1e4,
             "kid_balanced_std": 1e-4, "memorisation": 0.05, "fid": None, "fid_balanced": None, "n_test": 1750, "n_balanced": 900, "n_train": 2000,
             **(SETTINGS | settings)} for s, v in fds.items()]
    pd.DataFrame(rows)[convergence.COLUMNS].to_csv(run_dir / "convergence.csv", index=False)
    if losses:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5, "heldout_loss": v}) + "\n"
                                                       for s, v in losses.items()))
    return run_dir


def conv(tmp_path, *over):
    return convergence.run(compose("eval/convergence", [f"results_dir={tmp_path / 'results'}", *over]))


def test_report_gives_mean_spread_and_n_per_arm_and_steps_to_target(tmp_path):
    a = [write_curve(tmp_path / f"full-s{i}", {100: 90.0 + i, 200: 60.0 + i, 300: 41.0 + 2 * i}) for i in (0, 1)]
    b = [write_curve(tmp_path / f"rs-s{i}", {100: 70.0 + i, 200: 39.0 + i, 300: 33.0}, {100: 0.3, 200: 0.2 + i})
         for i in (0, 1)]
    runs = f"runs={{full:[{a[0]},{a[1]}],rsprune:[{b[0]},{b[1]}]}}"
    res = conv(tmp_path, runs, "target_fd=40")
    assert res["steps_to_target"] == {"full": None, "rsprune": 200}
    md = (tmp_path / "results" / "convergence.md").read_text()
    # FD at step 300: full 41 and 43 -> 42.00 ± 1.41 (2); rsprune 33, 33 -> no spread
    assert "| 300 | 42.00 ± 1.41 (2) | 33.00 ± 0.00 (2) |" in md, md
    assert "| 200 | - | 0.7000 ± 0.7071 (2) |" in md  # held-out loss from metrics.jsonl; full logged none
    assert "FD (EfficientNet-Lite2)" in md and "FID" not in md
    # paired by seed: full - rsprune at step 300 is 41 - 33 = 8 (s0) and 43 - 33 = 10 (s1): mean 9, SE 1,
    # t = 9 on 1 degree of freedom; held-out loss has no full run, so no pair
    p = 2 * stats.t.sf(9.0, 1)
    assert f"| fd | 300 | full - rsprune | 0,1 | 8.00 / 10.00 | 9.00 ± 1.00 | 9.00 (1) | {p:.3f} | none shown |" in md, md
    assert "heldout_loss |" not in md.split("## Paired differences")[1]
    assert Image.open(tmp_path / "results" / "convergence.png").size[0] > 400
    # arms by a config key: each run its own arm without one
    res = conv(tmp_path, f"runs=[{a[0]},{b[0]}]")
    assert set(res["steps_to_target"]) == {"full-s0", "rs-s0"}
    # committed records named <arm>-s<seed>, given as glob patterns: grouped by folder name less the seed
    res = conv(tmp_path, f"runs=[{tmp_path}/full-s*,{tmp_path}/rs-s*]", "arm_key=folder", "target_fd=40")
    assert res["steps_to_target"] == {"full": None, "rs": 200}
    assert "| 300 | 42.00 ± 1.41 (2) | 33.00 ± 0.00 (2) |" in (tmp_path / "results" / "convergence.md").read_text()


def test_runs_scored_against_other_test_splits_or_sample_counts_are_refused(tmp_path):
    a = write_curve(tmp_path / "a", {100: 50.0})
    other_split = write_curve(tmp_path / "b", {100: 40.0}, test_sha256="b" * 64)
    fewer = write_curve(tmp_path / "c", {100: 40.0}, n_fake=500)
    for b in (other_split, fewer):
        with pytest.raises(UsageError, match="do not compare"):
            conv(tmp_path, f"runs=[{a},{b}]")
    p = subprocess.run([sys.executable, "eval/convergence.py", f"runs=[{a},{other_split}]",
                        f"results_dir={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "do not compare" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "r" / "convergence.md").exists()


def test_old_protocol_csv_is_refused(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    pd.DataFrame([{"step": 1, "fd": 3.0, "key": "k"}]).to_csv(old / "convergence.csv", index=False)
    with pytest.raises(UsageError, match="old protocol"):
        conv(tmp_path, f"runs=[{old}]")


def test_bad_run_folders_are_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for runs, msg in ((f"[{tmp_path / 'empty'}]", "no snapshot"), (f"[{tmp_path / 'absent'}]", "does not exist"),
                      ("[]", "no run folders")):
        with pytest.raises(UsageError, match=msg):
            conv(tmp_path, f"runs={runs}")


def test_balanced_resample_draws_every_class_down_to_the_smallest(tmp_path):
    paths = [str(DATA / "aid" / c / f"{c.lower()}_{i}.jpg") for c, n in (("Beach", 5), ("Forest", 9), ("Port", 3))
             for i in range(n)]
    readable = np.ones(len(paths), bool)
    readable[0] = False  # an unreadable Beach image: rows index the readable features only
    idx = convergence.balanced_index(paths, readable, seed=0)
    labels = np.array([Path(p).parent.name for p in sorted(paths)])[readable][idx]
    assert sorted(labels.tolist()) == ["Beach"] * 3 + ["Forest"] * 3 + ["Port"] * 3
    assert (convergence.balanced_index(paths, readable, seed=0) == idx).all()


def test_memorisation_rate_sees_copies_of_training_images():
    from eval.memorisation import memorisation_rate, threshold
    from rsprune.features import build_extractor, extract_features

    files = sorted(str(p) for p in (DATA / "aid").rglob("*.jpg"))[::40]  # ~250 images over the classes
    ex = build_extractor("efficientnet_lite2", overrides={"resolution": 64})
    f = extract_features(files, ex, num_workers=0, pre_size=64)[0]
    train, test, unseen = f[0::3], f[1::3], f[2::3]
    q = threshold(train, test, 5.0)
    assert memorisation_rate(train, train[:40] + 1e-3, q) == 1.0  # near-copies of training images
    assert memorisation_rate(train, unseen, q) < 0.25  # other real images: about the 5% of test images


def test_tables_registry_runs_named_sections_and_fails_loudly_on_absent_modules(tmp_path):
    full = write_curve(tmp_path / "full", {10: 5.0, 20: 4.0})
    drop = [f"~sections.{n}" for n in compose("eval/tables").sections if n != "convergence"]  # each costs minutes
    conv = [f"sections.convergence.set.runs=[{full}]", f"sections.convergence.set.results_dir={tmp_path / 'r'}"]
    res = tables.run(compose("eval/tables", drop + conv))
    assert res["done"] == ["convergence"] and (tmp_path / "r" / "convergence.md").is_file()
    # a registry entry naming a module that is not there is broken, not "not yet": all fails, naming it
    with pytest.raises(UsageError, match="later: module downstream.not_yet not found"):
        tables.run(compose("eval/tables", drop + conv + ["+sections.later.fn=downstream.not_yet:section"]))
    with pytest.raises(UsageError, match="section later: eval.convergence has no function 'nope'"):
        tables.run(compose("eval/tables", ["section=later", "+sections.later.fn=eval.convergence:nope"]))
    with pytest.raises(UsageError, match="unknown section"):
        tables.run(compose("eval/tables", ["section=nope"]))


def test_tables_registry_reaches_downward_only():
    """eval sits below downstream: no section of the registry may load a downstream module."""
    cfg = compose("eval/tables")
    assert {n: str(s.fn).split(".")[0] for n, s in cfg.sections.items()} == {n: "eval" for n in cfg.sections}


def test_tables_cli_missing_run_folder_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "eval/tables.py", "convergence",
                        f"sections.convergence.set.runs=[{tmp_path / 'absent'}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.slow
def test_convergence_scores_every_snapshot_of_a_tiny_real_run_against_the_test_split(tmp_path):
    from train.main import run as train
    from conftest import aid_paths, tiny_overrides, write_kept

    kept = write_kept(tmp_path / "prune", aid_paths(24))
    test = tmp_path / "test"  # a test split of 4 classes x 6 real AID images, none of them trained on
    trained = {Path(p).name for p in aid_paths(24)}
    for cls in ("Beach", "Forest", "Desert", "Farmland"):
        (test / cls).mkdir(parents=True)
        for f in [f for f in sorted((DATA / "aid" / cls).iterdir()) if f.name not in trained][:6]:
            (test / cls / f.name).symlink_to(f)
    run_dir = tmp_path / "run"
    train(compose("train", tiny_overrides(kept, run_dir, tmp_path / "cache",
                                          **{"train.sample_every": 0, "data.test": str(test)})))
    args = [f"runs=[{run_dir}]", f"test={test}", "n_samples=8", "steps=3", "batch_size=8", "resolution=64",
            "sheet_n=4", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'fid'}", "warn_below=0"]
    res = convergence.run(compose("eval/convergence", args))
    csv = pd.read_csv(run_dir / "convergence.csv")
    assert list(csv["step"]) == [3, 6] and (csv["fd"] > 0).all() and (csv["n_fake"] == 8).all()
    assert (csv["n_test"] == 24).all() and (csv["n_balanced"] == 24).all() and (csv["n_train"] == 24).all()
    assert csv["memorisation"].between(0, 1).all() and (csv["kid_std"] > 0).all()
    assert (csv["fid"] > 0).all() and (csv["fid_balanced"] > 0).all()  # Inception FID of the same samples
    from rsprune.split import describe
    assert (csv["test_sha256"] == describe(str(test))["sha256"]).all()
    md = (tmp_path / "results" / "convergence.md").read_text()
    from train.heldout import read_steps
    at3 = read_steps(run_dir)[3].astype(np.float64)  # the held-out loss, from its per-image file
    assert f"| 3 | {at3.mean():.4f} (n=1) |" in md
    assert "## held-out denoising loss, class-balanced" in md and "Worst class at step 6 (runs): run: " in md
    # the yardstick: 8 of the 24 real training images scored like the samples, in the report too
    yard = json.loads((run_dir / "yardstick.json").read_text())
    assert yard["n_real"] == 8 and yard["fd"] > 0 and yard["n_fake"] == 8 and yard["fid"] > 0
    assert "## FID (Inception-v3 pool3, 299 px) against the whole test split" in md
    assert "## Yardstick: real training images scored like samples" in md and "| run | " in md
    assert res["test_sha256"] == describe(str(test))["sha256"]
    assert Image.open(tmp_path / "results" / "samples" / "run.png").size[0] > 8 * 32
    before = (run_dir / "convergence.csv").read_text()  # rerun: every step already scored alike
    convergence.run(compose("eval/convergence", args + ["sheet_n=0"]))
    assert (run_dir / "convergence.csv").read_text() == before
    # a run that recorded another test split when it trained is refused
    (run_dir / "split.json").write_text(json.dumps({"test": [{"path": "x", "n": 1, "sha256": "f" * 64}]}))
    with pytest.raises(UsageError, match="another test split"):
        convergence.run(compose("eval/convergence", args + ["n_samples=9"]))


def test_four_arms_are_compared_pair_by_pair_at_every_step_by_the_paired_t_test(tmp_path):
    arms = ["full", "rsprune", "random", "kmeans_uniform_filtered"]
    rng = np.random.default_rng(0)
    seed_effect = {s: 10.0 * s for s in range(3)}  # seeds move every arm alike
    for k, arm in enumerate(arms):
        for s in range(3):
            write_curve(tmp_path / f"{arm}-s{s}", {1000: 500 + seed_effect[s] + k + rng.normal(0, 0.1),
                                                    4000: 400 + seed_effect[s] + 2 * k + rng.normal(0, 0.1)},
                        {1000: 0.9 - 0.001 * k + 1e-4 * s + rng.normal(0, 1e-5), 4000: 0.8 - 0.001 * k + 2e-4 * s})
    conv(tmp_path, "runs=[" + ",".join(f"{tmp_path}/{a}-s*" for a in arms) + "]", "arm_key=folder")
    md = (tmp_path / "results" / "convergence.md").read_text()
    paired_part = md.split("## Paired differences between arms")[1].split("\n## ")[0]
    rows = [ln.split(" | ") for ln in paired_part.splitlines() if ln.startswith("| ") and ln[2:8] in (
        "fd | 1", "fd | 4", "fd_bal", "kid | ", "memori", "heldou")]
    # 6 arm pairs x 2 steps x (fd, fd_balanced, kid, memorisation, heldout_loss)
    assert len(rows) == 6 * 2 * 5
    assert "there are 60 comparisons here (42 testable)" in md
    fd = {r[2]: r for r in rows if r[0] == "| fd" and r[1] == "4000"}
    assert set(fd) == {f"{a} - {b}" for i, a in enumerate(arms) for b in arms[i + 1:]}
    curves = {a: pd.concat(pd.read_csv(tmp_path / f"{a}-s{s}" / "convergence.csv").assign(s=s) for s in range(3))
              for a in arms}
    for pair, r in fd.items():
        a, b = pair.split(" - ")
        x, y = (curves[arm].query("step == 4000").sort_values("s")["fd"].to_numpy() for arm in (a, b))
        assert r[7] == f"{stats.ttest_rel(x, y).pvalue:.3f}" or r[7] == f"{stats.ttest_rel(x, y).pvalue:.1e}"
        assert r[8] == "**difference** (p < 0.05)"  # 2 FD apart per arm step, seeds 10 apart: the pairing sees it
    # memorisation is the same in every run, and so is each held-out gap at 4000: no spread, no test
    assert all(r[8] == "untested (no spread)" for r in rows if r[0] == "| memorisation" or r[1] == "4000" and r[0] == "| heldout_loss")
    assert "beyond the spread" not in md and "spread = std(a) + std(b)" not in md


def test_a_damaged_snapshot_is_skipped_with_a_warning_and_the_good_steps_are_scored(tiny_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    from train.generate import list_snapshots

    steps = list_snapshots(run_dir)
    last = steps[-1][1] / "unet_ema" / "diffusion_pytorch_model.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # the newest snapshot cut short
    test = json.loads((run_dir / "split.json").read_text())["test"][0]["path"]
    args = [f"runs=[{run_dir}]", f"test={test}", "n_samples=4", "steps=2", "batch_size=4", "resolution=32",
            "sheet_n=0", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'fid'}", "warn_below=0",
            "fid=false", "memorisation=false"]
    convergence.run(compose("eval/convergence", args))
    csv = pd.read_csv(run_dir / "convergence.csv")
    assert list(csv["step"]) == [s for s, _ in steps[:-1]]  # every good step scored
    assert f"step {steps[-1][0]}: snapshot does not load" in capsys.readouterr().err
    assert (tmp_path / "results" / "convergence.md").is_file()
