"""Paired statistics between arms (eval/paired.py) in the convergence report, on shrunk real runs
of four arms x two seeds that kept per-image held-out losses."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import stats
from conftest import aid_paths, tiny_overrides, write_kept

from eval import convergence, paired
from rsprune.cli import UsageError, compose

ARMS = ("full", "rsprune", "random", "kmeans_uniform_filtered")
SHRUNK = {"train.max_steps": 2, "train.checkpoint_every": 2, "train.snapshot_steps": "[1]",
          "train.sample_every": 0, "eval.heldout_n": "all"}


TEST_CLASSES = {"Beach": 3, "Forest": 2, "Desert": 1, "Port": 2}  # unequal: balanced != natural mix


@pytest.fixture(scope="module")
def four_arms(tmp_path_factory):
    """arm-s<seed> run folders: each arm its own 12 real AID images, seeds 0 and 1, one test list
    of real AID images of four classes of unequal size, none of them trained on."""
    from train.main import run
    from conftest import DATA

    root = tmp_path_factory.mktemp("paired")
    kept = {arm: aid_paths(12, offset=k) for k, arm in enumerate(ARMS)}
    trained = {p for ps in kept.values() for p in ps}
    test = root / "test.txt"
    test.write_text("".join(str(f) + "\n" for c, n in TEST_CLASSES.items()
                            for f in [f for f in sorted((DATA / "aid" / c).iterdir()) if str(f) not in trained][:n]))
    for arm in ARMS:
        for seed in (0, 1):
            over = tiny_overrides(write_kept(root / "prune" / arm, kept[arm]), root / "runs" / f"{arm}-s{seed}",
                                  root / "cache", seed=seed, **SHRUNK)
            run(compose("train", [o for o in over if not o.startswith("data.test=")] + [f"data.test={test}"]))
    return root


def _report(root, *extra):
    runs = ",".join(str(root / "runs" / f"{a}-s*") for a in ARMS)
    return convergence.run(compose("eval/convergence", [f"runs=[{runs}]", "arm_key=folder", "score_steps=[]",
                                                        f"results_dir={root / 'results'}", *extra]))


def _table(md: str, section: str) -> list[list[str]]:
    part = md.split(section, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in part.splitlines()
            if ln.startswith("| ") and not ln.startswith("| metric") and not ln.startswith("| step")]


@pytest.mark.slow
def test_four_arms_with_per_image_files_get_paired_tests_and_bootstraps(four_arms):
    from train.heldout import class_means, read_index, read_steps

    _report(four_arms)
    md = (four_arms / "results" / "convergence.md").read_text()
    for head in ("natural mix", "class-balanced (mean of per-class means", "worst class (highest class mean"):
        assert head in md, head
    rows = _table(md, "## Paired differences between arms")
    # 6 arm pairs x 2 probed steps x 3 held-out metrics (no FD was scored)
    assert len(rows) == 6 * 2 * 3 and {r[0] for r in rows} == {
        "heldout_loss", "heldout_loss_balanced", "heldout_loss_worst_class"}
    assert "Per-image held-out losses: 8 of 8 runs (8 test images, 4 classes)" in md
    index = read_index(four_arms / "runs" / "full-s0")
    assert {c: index["classes"].count(f"aid/{c}") for c in TEST_CLASSES} == TEST_CLASSES
    for metric, step, pair, seeds, diffs, mean_se, t_df, p, verdict, holm, boot, boot_p in rows:
        a, b = pair.split(" - ")
        per_seed = []
        for s in (0, 1):
            la, lb = (read_steps(four_arms / "runs" / f"{arm}-s{s}")[int(step)].astype(np.float64).mean(axis=1)
                      for arm in (a, b))
            if metric == "heldout_loss":
                per_seed.append(la.mean() - lb.mean())
            else:
                ma, mb = (class_means(x, index["classes"]) for x in (la, lb))
                per_seed.append(np.mean(list(ma.values())) - np.mean(list(mb.values())) if metric.endswith("balanced")
                                else max(ma.values()) - max(mb.values()))
        shown = [float(x) for x in diffs.split(" / ")]
        assert seeds == "0,1" and shown == pytest.approx(per_seed, abs=5.1e-5), (metric, pair, step)
        d = np.array(per_seed)
        t = d.mean() / (d.std(ddof=1) / np.sqrt(2))
        assert t_df == f"{t:.2f} (1)" and p == paired.fmt_p(2 * stats.t.sf(abs(t), 1))
        assert verdict == ("**difference** (p < 0.05)" if 2 * stats.t.sf(abs(t), 1) < 0.05 else "none shown")
        assert (boot == "—") == (metric == "heldout_loss_worst_class")  # no bootstrap of a maximum
        if boot != "—":
            lo, hi = (float(x) for x in boot.strip("[]").split(", "))
            assert lo <= d.mean() + 5e-5 and d.mean() - 5e-5 <= hi
    assert "Worst class at step 2 (runs): full: aid/" in md


@pytest.mark.slow
def test_runs_whose_per_image_rows_differ_are_refused(four_arms, tmp_path):
    other = tmp_path / "random-s9"
    shutil.copytree(four_arms / "runs" / "random-s0", other)
    ix = other / "heldout" / "index.json"
    ix.write_text(json.dumps(json.loads(ix.read_text()) | {"noise_seed": 5}))
    runs = f"runs=[{four_arms / 'runs' / 'full-s0'},{other}]"
    with pytest.raises(UsageError, match="differ in noise_seed"):
        convergence.run(compose("eval/convergence", [runs, "score_steps=[]", f"results_dir={tmp_path}"]))


def test_paired_test_sees_a_consistent_gap_the_seed_spread_hides():
    seed_effect = np.array([520.0, 531.0, 544.0])  # seeds differ far more than arms do
    a, b = seed_effect + 1.0 + np.array([0.05, -0.05, 0.0]), seed_effect
    r = paired.ttest(a, b)
    assert r["mean"] == pytest.approx(1.0) and r["se"] == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(3))
    assert r["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and r["p"] < 0.01
    assert a.std(ddof=1) + b.std(ddof=1) > 10 * abs(a.mean() - b.mean())  # what the sum-of-stds rule missed
    assert paired.verdict(r) == "**difference** (p < 0.05)"
    assert paired.ttest([1.0], [0.5])["p"] is None and paired.verdict(paired.ttest([1.0], [0.5])).startswith("untested")
    assert paired.holm([0.01, 0.04, None, 0.03]) == [True, False, None, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2


@pytest.mark.slow
def test_bootstrap_is_paired_and_shift_equivariant(four_arms):
    from train.heldout import read_index, read_steps

    classes = read_index(four_arms / "runs" / "full-s0")["classes"]
    d = np.stack([read_steps(four_arms / "runs" / f"full-s{s}")[2].mean(axis=1)
                  - read_steps(four_arms / "runs" / f"random-s{s}")[2].mean(axis=1) for s in (0, 1)])
    base, shifted = paired.bootstrap(d, classes), paired.bootstrap(d + 0.25, classes)
    assert shifted["lo"] == pytest.approx(base["lo"] + 0.25) and shifted["hi"] == pytest.approx(base["hi"] + 0.25)
    assert base["lo"] <= base["mean"] <= base["hi"] and shifted["p"] == 1 / paired.N_BOOT  # every resample > 0
    bal = paired.bootstrap(d, classes, balanced=True)
    means = [d[:, np.asarray(classes) == c].mean() for c in sorted(set(classes))]
    assert bal["mean"] == pytest.approx(np.mean(means))
