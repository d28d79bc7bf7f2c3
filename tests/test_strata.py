"""Issue 14: calibrated scene strata with pseudo-scenes, density held to its released code,
hierarchical k-means, and the imbalanced development corpus; on small real corpora."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import DATA, shrunk_overrides
from prune.budget import qp_quotas
from prune.methods.hkmeans import balanced_quotas
from prune.run import run
from prune.scenes import n_pseudo
from rsprune.cli import UsageError
from rsprune.manifest import read_manifest


def test_qp_quotas_solve_the_released_qp_and_keep_the_budget():
    """The bisection solution against scipy's solver of the same QP (min ||x - B p||^2,
    sum x = B, min(int(0.5 B / k), n - 1) <= x <= n), then rounded to exactly B."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 80, 40)
    p = rng.dirichlet(np.full(40, 0.3))  # peaked shares: the minimum binds for many clusters
    budget = int(0.15 * sizes.sum())
    got = qp_quotas(sizes, p, budget, 0.5)
    assert got.sum() == budget and (got <= sizes).all()
    lb = np.minimum(int(0.5 * budget / 40), sizes - 1)
    assert (got >= lb).all() and (got[lb > 0] > 0).all()
    res = minimize(lambda x: ((x - budget * p) ** 2).sum(), np.clip(budget * p, lb, sizes), method="SLSQP",
                   bounds=list(zip(lb, sizes)), constraints=[{"type": "eq", "fun": lambda x: x.sum() - budget}],
                   options={"maxiter": 500, "ftol": 1e-12})
    assert np.abs(got - res.x).max() <= 1.0 + 1e-6


def test_density_gives_every_cluster_the_released_minimum(prune_cfg, tmp_path):
    """Water-filling at temperature 0.02 starved clusters; the QP keeps min(int(0.5 B/k), n-1)."""
    s = run(prune_cfg("method=density", "ratio=0.5", run_dir=tmp_path / "d"), progress=False)
    m = read_manifest(tmp_path / "d")
    g = m[m.cluster >= 0].groupby("cluster").agg(n=("id", "size"), kept=("selected", "sum"))
    floor = int(0.5 * s["counts"]["budget"] / len(g))
    assert floor >= 1 and (g.kept >= np.minimum(floor, g.n - 1)).all(), g[g.kept < np.minimum(floor, g.n - 1)]
    assert s["config"]["method"]["temperature"] == 0.5 and m.selected.sum() == s["counts"]["budget"]


def test_calibrated_threshold_and_pseudo_scenes_on_a_corpus_from_another_source(prune_cfg, tmp_path):
    """NWPU corpus, AID reference: the threshold is the reference's held-out quantile, the
    unmatched images form pseudo-scenes by the recorded rule, and summary.json says so."""
    s = run(prune_cfg(run_dir=tmp_path / "r"), progress=False)
    info, m = s["scenes"], read_manifest(tmp_path / "r")
    usable = m[m.readable & (m.reason != "pruned_exact_duplicate")]
    assert info["rule"].startswith("reference") and info["threshold"] == pytest.approx(
        info["reference_heldout_similarity"]["p25"])
    matched = usable.scene_similarity >= info["threshold"]
    assert info["matched"] == matched.sum() and 0 < info["matched_share"] < 1
    k = n_pseudo(int((~matched).sum()), len(usable), 30, "auto")
    assert info["pseudo_scenes"] == k >= 2 and sum(info["pseudo_scene_sizes"]) == (~matched).sum()
    assert (usable.scene[~matched] >= 30).all() and (usable.scene[matched] < 30).all()
    assert not (usable.scene_name == "unmatched").any()
    assert {f"pseudo_{j:02d}" for j in range(k)} == set(usable.scene_name[~matched])
    assert set(s["per_scene"]) >= {f"pseudo_{j:02d}" for j in range(k)}


def test_corpus_folders_as_strata_balance_an_imbalanced_corpus_without_a_reference(session_cache, tmp_path):
    """scenes.assign=folder: the corpus's own class folders are the strata (the reference is never
    read: it does not even exist here); with equal quotas each class keeps the water level or all
    it has after the entropy filter, and the budget is exact."""
    from rsprune.zipf_corpus import build
    from prune.budget import waterfill
    from rsprune.cli import compose

    corpus = build(DATA / "nwpu12" / "train", tmp_path / "c", 40, 8, 0)
    cfg = compose("prune", shrunk_overrides(corpus, tmp_path / "no_reference", tmp_path / "r", session_cache,
                                            "scenes.assign=folder", "selection.mass=count", "selection.alpha=0",
                                            "ratio=0.8"))
    s = run(cfg, progress=False)
    m = read_manifest(tmp_path / "r")
    m["cls"] = m.relpath.str.split("/").str[0]
    g = m.groupby("cls").agg(pool=("stage1_kept", "sum"), kept=("selected", "sum"), n=("id", "size"))
    assert s["scenes"]["rule"].startswith("corpus class folders") and s["scenes"]["matched_scenes"] == 12
    assert g.kept.sum() == s["counts"]["budget"] and g.n.max() >= 4 * g.n.min()
    assert (g.kept.to_numpy() == waterfill(g.pool.to_numpy(), np.ones(len(g)), s["counts"]["budget"])).all()
    assert (m.scene_name == m.cls).all()


def test_corpus_folders_as_strata_need_class_folders(small_reference, session_cache, tmp_path):
    from rsprune.cli import compose

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((DATA / "nwpu12" / "train" / "beach").iterdir())[:6]:
        (flat / f.name).symlink_to(f)
    cfg = compose("prune", shrunk_overrides(flat, small_reference, tmp_path / "r", session_cache,
                                            "scenes.assign=folder", "ratio=0.5"))
    with pytest.raises(UsageError, match="class folders for scenes.assign=folder"):
        run(cfg, progress=False)


def test_absolute_threshold_and_one_unmatched_stratum_still_available(prune_cfg, tmp_path):
    s = run(prune_cfg("scenes.threshold=0.55", "scenes.pseudo_size=0", run_dir=tmp_path / "r"), progress=False)
    m = read_manifest(tmp_path / "r")
    ok = m[m.scene >= -1]
    assert ((ok.scene == -1) == (ok.scene_similarity < 0.55)).all() and (ok.scene == -1).any()
    assert s["scenes"]["pseudo_scenes"] == 0 and s["scenes"]["rule"] == "absolute"


@pytest.mark.parametrize("bad", ["scenes.threshold=high", "scenes.quantile=1.5", "scenes.pseudo_size=-3",
                                 "method=density method.quotas=greedy"])
def test_bad_scene_and_density_values_are_usage_errors(prune_cfg, tmp_path, bad):
    with pytest.raises(UsageError):
        run(prune_cfg(bad, *(["method=density"] if "quotas" not in bad else []), run_dir=tmp_path / "r"),
            progress=False)


def test_hierarchical_quotas_balance_down_the_tree():
    """Leaves 0 (a dense region: 100 images) and 1-3 (one small each) under two top nodes: the
    budget splits 2/2 at the top, so the dense leaf no longer takes almost everything."""
    got = balanced_quotas(np.array([100, 1, 1, 1]), [np.array([0, 1, 1, 1])], 4)
    assert got.tolist() == [2, 1, 1, 0]  # the rounding's ties go to the lower index


def test_imbalanced_corpus_is_zipf_links_only_and_reproducible(tmp_path):
    from rsprune.zipf_corpus import build, zipf_sizes

    assert zipf_sizes(12, 400, 16)[0] == 400 and zipf_sizes(12, 400, 16)[-1] == 25
    dst = build(DATA / "nwpu12" / "train", tmp_path, 400, 16, 0)
    sizes = sorted(len(os.listdir(dst / c)) for c in os.listdir(dst))
    assert sizes == sorted(zipf_sizes(12, 400, 16))
    f = next((dst / "beach").iterdir())
    assert f.is_symlink() and f.resolve().is_relative_to(DATA.resolve())
    assert build(DATA / "nwpu12" / "train", tmp_path, 400, 16, 0) == dst  # same plan: kept
    with pytest.raises(FileExistsError):
        build(DATA / "nwpu12" / "train", tmp_path, 400, 16, 1)


def test_imbalanced_corpus_from_chosen_classes_of_another_source(tmp_path):
    """The reversed check's corpora: a chosen subset of AID's classes under their own root name."""
    from rsprune.zipf_corpus import build, zipf_sizes

    chosen = ["Airport", "Bridge", "Pond", "Viaduct"]
    dst = build(DATA / "aid", tmp_path, 220, 16, 1, chosen, "aid_zipf")
    assert dst.name == "aid_zipf" and sorted(os.listdir(dst)) == chosen
    assert sorted(len(os.listdir(dst / c)) for c in chosen) == sorted(zipf_sizes(4, 220, 16))
    with pytest.raises(UsageError, match="Meadows"):
        build(DATA / "aid", tmp_path / "x", 220, 16, 1, ["Airport", "Meadows"], "aid_zipf")


def test_balance_over_one_source_reads_only_its_classes():
    """KL to uniform over the NWPU classes ignores the AID classes (which built the strata)."""
    from eval.subset_quality import group_balance, kl

    hist = {"aid/Airport": 90, "aid/Beach": 1, "nwpu12/beach": 10, "nwpu12/lake": 30}
    got = group_balance(hist, {"nwpu": "nwpu12/"})["kl_uniform_nwpu"]
    assert got == pytest.approx(kl(np.array([10.0, 30.0]), np.ones(2))) and got > 0
    assert np.isnan(group_balance(hist, {"x": "other/"})["kl_uniform_x"])


def test_heldout_section_builds_its_corpora_and_reports_every_method(small_reference, session_cache, tmp_path):
    """`eval/tables.py imbalanced_heldout` on the real config shrunk: one held-out corpus (40 down to
    10 images a class), two methods, the four rsprune variants and both true-strata bounds, one seed;
    the table holds what evaluate_runs measured. The table only reads: prune/sweep.py runs them first."""
    from eval.imbalanced import heldout_section
    from prune.sweep import run_section
    from rsprune.cli import compose

    shrunk = [f"data.reference={small_reference}", f"cache_dir={session_cache}", "index.num_workers=0",
              "embed.shard_size=128", "clustering.min_sample=50", "clustering.cluster_size=10"]
    cfg = compose("eval/imbalanced", [
        f"data_root={DATA}", f"out={tmp_path / 'corpora'}", f"cache_dir={session_cache}", "top=40",
        "embed.shard_size=128", "sweep.overrides=[" + ",".join(f"'{o}'" for o in shrunk) + "]",
        "~heldout.corpora", "+heldout.corpora={s1: {corpus_seed: 5, factor: 4}}",
        "heldout.methods=[rsprune,random]", "heldout.seeds=[0]", "heldout.ratios=[0.85]",
        f"heldout.runs_root={tmp_path / 'runs'}", f"heldout.out={tmp_path / 'heldout'}"])
    with pytest.raises(UsageError, match=r"8 of the 8 prune runs .* run `python prune/sweep.py imbalanced_heldout`"):
        heldout_section(cfg)  # nothing was run: the table says which command runs them, and runs nothing
    assert not (tmp_path / "runs").exists() and not (tmp_path / "heldout.md").exists()
    assert len(run_section("imbalanced_heldout", cfg, progress=False)) == 8
    df = heldout_section(cfg)
    assert sorted(df.method) == ["random", "rsprune", "rsprune core 0.5, dull_z off (the previous pick)",
                                 "rsprune core 1, dull_z off (no share, no sharpness order)",
                                 "rsprune mass=count", "rsprune no reference",
                                 "true strata, equal quotas", "true strata, rsprune quotas"]
    assert (df.corpus == "s1").all()
    noref = json.loads((tmp_path / "runs" / "s1" / "rsprune_no_reference-r0.85-s0" / "summary.json").read_text())
    assert noref["scenes"]["matched"] == 0 and noref["scenes"]["pseudo_scenes"] >= 2  # what its name says
    sizes = sorted(len(os.listdir(tmp_path / "corpora" / "s1" / "nwpu_zipf" / c))
                   for c in os.listdir(tmp_path / "corpora" / "s1" / "nwpu_zipf"))
    assert sizes[0] == 10 and sizes[-1] == 40
    text = (tmp_path / "heldout.md").read_text()
    bound = df.method.str.startswith("true strata")
    for _, r in df[~bound].iterrows():
        assert f"| {r.method} | " in text and f"{r.kl_uniform:.4f}" in text and f"{r.fd:.4f}" in text
    for _, r in df[bound].iterrows():  # below the table, never ranked in it
        assert f"Bound, {r.method}: KL {r.kl_uniform:.4f}" in text and f"| {r.method} |" not in text
    equal = df.set_index("method").kl_uniform["true strata, equal quotas"]
    assert equal < df[~bound].kl_uniform.min()  # the true classes as strata, equal quotas: the most balanced
    assert (df.kl_uniform > 0).all() and "ratio 0.85" in text
    assert (tmp_path / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside it
