"""Training-free subset quality and the baselines' own rules, on small real corpora."""
from __future__ import annotations

import numpy as np

from eval.subset_quality import evaluate_runs, kl, quality
from prune.methods.semdedup import duplicate_scores
from prune.run import run
from rsprune.cli import compose
from rsprune.manifest import read_manifest


def test_quality_metrics_on_extreme_subsets():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))
    labels = np.repeat(np.arange(6), 50).astype(str)
    feats = centres[np.repeat(np.arange(6), 50)] + 0.3 * rng.normal(size=(300, 32))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ent = np.full(300, 5.0)
    everything = quality(feats, np.ones(300, bool), ent, labels, 0.95)
    assert everything["fd"] < 1e-6 and everything["coverage_mean"] < 1e-5
    assert everything["classes_present"] == 6 and abs(everything["kl_corpus"]) < 1e-12
    spread = np.zeros(300, bool)
    spread[::10] = True  # 5 of each class
    one_class = np.zeros(300, bool)
    one_class[:30] = True
    a, b = quality(feats, spread, ent, labels, 0.95), quality(feats, one_class, ent, labels, 0.95)
    assert a["fd"] < b["fd"] and a["coverage_mean"] < b["coverage_mean"]
    assert b["classes_present"] == 1 and np.isclose(b["kl_uniform"], np.log(6))
    assert kl(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0


def test_semdedup_scores_rank_duplicates_last():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16))
    x = np.concatenate([x, x[:5] + 1e-3 * rng.normal(size=(5, 16))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - x @ (x.mean(0) / np.linalg.norm(x.mean(0)))
    ids = np.array([f"{i:03d}" for i in range(45)])
    s = duplicate_scores(x, dist, ids)
    # Of each near-identical pair, exactly one scores ~1 (the one later in farthest-first order).
    for i in range(5):
        assert sorted([s[i] > 0.99, s[40 + i] > 0.99]) == [False, True]
    assert (s > 0.99).sum() == 5
    # The brute-force definition, without blocks.
    order = np.lexsort((ids, -dist))
    sim = x[order] @ x[order].T
    ref = np.array([-1.0] + [sim[i, :i].max() for i in range(1, 45)])
    assert np.allclose(s[order], ref, atol=1e-6)


def test_subset_quality_of_real_runs(prune_cfg, tmp_path):
    dirs = []
    for method in ("rsprune", "entropy"):
        run(prune_cfg(f"method={method}", "ratio=0.7", run_dir=tmp_path / method), progress=False)
        dirs.append(str(tmp_path / method))
    cfg = compose("eval/subset_quality", [f"runs=[{','.join(dirs)}]", f"cache_dir={tmp_path / 'c'}",
                                          "embed.shard_size=128"])
    res = evaluate_runs(dirs, cfg, progress=False)
    assert [r["method"] for r in res] == ["rsprune", "entropy"]
    for r in res:
        assert r["n"] == 72 and r["fd"] > 0 and 0 < r["coverage_mean"] < r["coverage_p95"] < 1
        assert r["classes_total"] == 12 and 1 <= r["classes_present"] <= 12
        assert sum(r["class_histogram"].values()) == 72
    m = read_manifest(dirs[1])
    assert np.isclose(res[1]["entropy_local"], m.entropy_local[m.selected].mean())
    # The entropy baseline keeps the highest-entropy images: its mean entropy is the maximum possible.
    assert res[1]["entropy_local"] >= res[0]["entropy_local"]
    again = evaluate_runs(dirs, cfg, progress=False)  # cached in the run folders
    assert [a["key"] for a in again] == [r["key"] for r in res]
