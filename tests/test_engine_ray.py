"""engine=ray on a local 2-CPU Ray cluster gives the single-process kept set, bit for bit, on
small real corpora: NWPU against an AID reference (pseudo-scenes, sampled and refined k-means)
and an imbalanced NWPU corpus; the single process at one BLAS/faiss thread, as a Ray task runs."""
from __future__ import annotations

import pytest

from conftest import DATA, shrunk_overrides
from prune.run import run
from rsprune.cli import UsageError, compose
from rsprune.manifest import read_manifest

ray = pytest.importorskip("ray")


def both(overrides, tmp_path):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # what a one-CPU Ray task runs with
        local = run(compose("prune", overrides(tmp_path / "local")), progress=False)
    on_ray = run(compose("prune", overrides(tmp_path / "ray") + ["engine=ray"]), progress=False)
    return local, on_ray


COLUMNS = ["scene", "scene_similarity", "cluster", "centroid_distance", "selected", "reason"]


def same_outputs(tmp_path, local, on_ray):
    assert (tmp_path / "ray" / "kept.txt").read_bytes() == (tmp_path / "local" / "kept.txt").read_bytes()
    a, b = read_manifest(tmp_path / "local"), read_manifest(tmp_path / "ray")
    for c in COLUMNS:
        assert a[c].equals(b[c]), c
    assert on_ray["counts"] == local["counts"] and on_ray["scenes"] == local["scenes"]
    assert on_ray["counts"]["selected"] == on_ray["counts"]["budget"]


def test_ray_keeps_the_same_set_on_a_corpus_from_another_source(local_ray, small_corpus, small_reference,
                                                                session_cache, tmp_path):
    overrides = lambda d: shrunk_overrides(small_corpus, small_reference, d, session_cache)
    local, on_ray = both(overrides, tmp_path)
    same_outputs(tmp_path, local, on_ray)
    assert local["scenes"]["pseudo_scenes"] >= 2  # the unmatched path ran
    assert on_ray["cached"]["scenes"] is False and on_ray["cached"]["clusters"] is False  # Ray computed them
    steps = {p.name.split("-")[0]: len(list(p.glob("*.npz"))) for p in (session_cache / "ray").glob("*/*")}
    assert steps["clusters"] > 1 and steps["volumes"] == steps["pick"] == steps["clusters"]  # a task per stratum
    vol_l, vol_r = local["method_info"]["volume"], on_ray["method_info"]["volume"]
    assert vol_r == vol_l


def test_ray_keeps_the_same_set_on_an_imbalanced_corpus(local_ray, small_reference, session_cache, tmp_path):
    from eval.imbalanced import build

    corpus = build(DATA / "nwpu12" / "train", tmp_path / "c", 60, 10, 0)
    overrides = lambda d: shrunk_overrides(corpus, small_reference, d, session_cache, "ratio=0.7")
    local, on_ray = both(overrides, tmp_path)
    same_outputs(tmp_path, local, on_ray)


def test_ray_cuts_big_steps_into_partitions_and_keeps_the_same_set(local_ray, small_corpus, small_reference,
                                                                   session_cache, tmp_path, monkeypatch):
    """What 10^7 rows run through, shrunk to 240 images: partitions of 8 rows, strata split into
    cells (their k-means assigned and refined partition by partition), a sampled pseudo-scene
    fit. The kept set is the single process's, and no task of a cut step is sent more rows than
    a partition (a group of whole clusters: a partition and the cluster that crosses its end)."""
    import prune.scenes
    import prune.state
    from prune.engine_ray import TASK_ROWS

    monkeypatch.setattr(prune.state, "PART", 8)
    monkeypatch.setattr(prune.scenes, "PSEUDO_SAMPLE", 16)
    monkeypatch.setattr(prune.scenes, "PSEUDO_PER_SCENE", 4)
    cut = ["clustering.cluster_size=2", "clustering.max_k=3", "clustering.min_sample=4", "clustering.sample_fraction=0.3"]
    TASK_ROWS.clear()
    local, on_ray = both(lambda d: shrunk_overrides(small_corpus, small_reference, d, session_cache, *cut), tmp_path)
    same_outputs(tmp_path, local, on_ray)
    for step in ("pseudo-assign", "clusters-cells-assign", "clusters-cells-sums0", "clusters-cells-assign1"):
        assert 0 < TASK_ROWS[step] <= 8, step
    sc = local["scenes"]
    unmatched = sc["images"] - sc["matched"]
    assert TASK_ROWS["pseudo-fit"] == max(16, 4 * sc["pseudo_scenes"]) < unmatched  # fitted on a sample
    largest = int(read_manifest(tmp_path / "ray").cluster.value_counts().drop(-1, errors="ignore").max())
    assert 0 < max(TASK_ROWS["volumes"], TASK_ROWS["pick"]) <= 8 + largest


@pytest.mark.parametrize("bad", ["engine=spark", "engine=ray method=random", "engine=ray selection.within=random",
                                 "engine=ray ray.address=127.0.0.1:9"])
def test_engine_errors_before_any_work(bad, small_corpus, small_reference, tmp_path):
    cfg = compose("prune", shrunk_overrides(small_corpus, small_reference, tmp_path / "r", tmp_path / "cache",
                                            *bad.split()))
    if ray.is_initialized():  # a module's local cluster would be reused instead of the address
        ray.shutdown()
    with pytest.raises(UsageError):
        run(cfg, progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()
