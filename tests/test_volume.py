"""Issue 14: scene mass by embedding volume (prune/volume.py) and the over-sampling fit that
sets `selection.mass=auto`; synthetic geometry for the estimators, real images for the pipeline."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, link_images
from prune.methods.rsprune import cluster_quotas
from prune.run import run
from prune.volume import (beta_of, image_volumes, intrinsic_dim, neighbour_distances, oversampling_fit,
                          scene_mass, volumes)
from rsprune.cli import UsageError
from rsprune.manifest import read_manifest


def patch(rng, n: int, dim: int, centre: int, width: float = 0.05, d: int = 64) -> np.ndarray:
    """n unit vectors filling a small `dim`-dimensional cube around axis `centre` of R^d."""
    x = np.zeros((n, d))
    x[:, centre] = 1.0
    x[:, 32:32 + dim] = rng.uniform(-width, width, (n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [3, 8])
def test_intrinsic_dimension_of_a_flat_patch(dim):
    """Levina-Bickel on a `dim`-dimensional patch inside R^64 finds about `dim`, not 64."""
    x = patch(np.random.default_rng(dim), 1500, dim, 0)
    got = intrinsic_dim(neighbour_distances(x, np.zeros(len(x), np.int64), 10))
    assert 0.75 * dim < got < 1.3 * dim


def test_small_clusters_use_the_neighbours_they_have_or_measure_nothing():
    """Clusters of 6 with k = 10 still give the dimension (5 neighbours a row); clusters of 3
    give none, and the volumes then weigh every image 1 (the count)."""
    x = patch(np.random.default_rng(2), 1200, 3, 0)
    got = intrinsic_dim(neighbour_distances(x, np.arange(1200) // 6, 10))
    assert 2.0 < got < 4.5
    tiny = np.arange(1200) // 3
    assert np.isnan(intrinsic_dim(neighbour_distances(x, tiny, 10)))
    v, info = volumes(x, tiny, 10, "auto")
    assert (v == 1.0).all() and info["dim"] == 0.0 and info["dim_rule"].startswith("none")


def test_neighbours_stay_inside_their_cluster_and_singletons_are_neutral():
    rng = np.random.default_rng(0)
    x = np.vstack([patch(rng, 30, 3, 0), patch(rng, 30, 3, 1), patch(rng, 1, 3, 2)])
    cluster = np.repeat([0, 1, 2], [30, 30, 1])
    d = neighbour_distances(x, cluster, 5)
    assert np.isfinite(d[:60]).all() and np.isnan(d[60]).all()
    assert (np.diff(d[:60], axis=1) >= 0).all() and d[:60].max() < 0.3  # never the other patch (~1.4 away)
    v = image_volumes(d, 3.0)
    assert v[60] == 1.0 and np.isclose(np.median(v[:60]), 1.0, atol=0.1)


def test_volume_follows_extent_not_count():
    """The same extent sampled 4x more densely covers about the same volume: count says 4:1."""
    rng = np.random.default_rng(1)
    x = np.vstack([patch(rng, 400, 3, 0), patch(rng, 100, 3, 1)])
    cluster = np.repeat([0, 1], [400, 100])
    v = image_volumes(neighbour_distances(x, cluster, 10), 3.0)
    ratio = v[:400].sum() / v[400:].sum()
    assert 0.6 < ratio < 1.6


def test_oversampling_fit():
    """beta = 1 when volume per image falls as 1 / count (over-sampled), 0 when unrelated or
    when there are too few strata to fit."""
    n = np.array([400, 200, 100, 50, 25, 3])

    def oversampling(n, vol, min_stratum):
        return beta_of(oversampling_fit(n, vol, min_stratum))

    assert oversampling(n, np.full(6, 10.0), 5) == pytest.approx(1.0)  # fixed extent: V / n ~ 1 / n
    assert oversampling(n, n * 0.2, 5) == pytest.approx(0.0)  # volume per image constant
    assert oversampling(n[:2], np.ones(2), 5) == 0.0


def test_scene_mass_sums_to_the_blend_and_raises_the_exponent():
    scene = np.repeat([0, 1, 2, 3], [40, 20, 10, 5])
    v = np.concatenate([np.full(40, 0.25), np.full(20, 0.5), np.full(10, 1.0), np.full(5, 2.0)])  # V = 10 each
    w, alpha, fit = scene_mass(scene, v, "auto", 0.5, 5)
    assert fit["oversampling_beta"] == pytest.approx(1.0) and alpha == pytest.approx(1.0)
    assert np.allclose(np.bincount(scene, weights=w), 10.0)  # n * (V / n)^1
    assert np.allclose(scene_mass(scene, v, "count", 0.5, 5)[0], 1.0)
    q = cluster_quotas(scene, scene, 20, alpha, w)  # one cluster per scene: equal mass, equal quotas
    assert sorted(q.values()) == [5, 5, 5, 5]
    assert sorted(cluster_quotas(scene, scene, 20, 1.0, None).values()) != [5, 5, 5, 5]


@pytest.fixture(scope="module")
def oversampled_corpus(tmp_path_factory):
    """Real NWPU images: 80 of `residential`, 10 of each of the 11 other classes."""
    root = tmp_path_factory.mktemp("oversampled") / "nwpu"
    link_images(root, DATA / "nwpu12" / "train", 10)
    for f in sorted((DATA / "nwpu12" / "train" / "residential").iterdir())[10:80]:
        (root / "residential" / f.name).symlink_to(f)
    return root


def test_auto_mass_on_an_oversampled_real_corpus(prune_cfg, oversampled_corpus, tmp_path):
    """The over-sampled class loses share under mass=auto against mass=count; the budget is
    exact, the fit is recorded, and a rerun selects the same images."""
    share, info = {}, {}
    for mass in ("count", "auto"):
        s = run(prune_cfg(f"data.corpus=[{oversampled_corpus}]", f"selection.mass={mass}", "ratio=0.7",
                          f"report.enabled={mass == 'auto'}", run_dir=tmp_path / mass), progress=False)
        m = read_manifest(tmp_path / mass)
        kept = m[m.selected]
        assert len(kept) == s["counts"]["budget"]
        share[mass] = kept.relpath.str.startswith("residential/").mean()
        info[mass] = s["method_info"]
    assert set(info["count"]) == {"dull_members"} and info["auto"]["volume"]["oversampling_beta"] > 0.2
    assert 0.5 < info["auto"]["volume"]["alpha_effective"] <= 1.0
    assert share["auto"] < share["count"]
    fit = info["auto"]["volume"]
    m = read_manifest(tmp_path / "auto")
    pool = m[m.stage1_kept & (m.reason != "pruned_exact_duplicate")]  # what the selection saw
    assert fit["strata"] == sorted(pool.scene.unique()) and sum(fit["stratum_images"]) == len(pool)
    assert (tmp_path / "auto" / "report" / "scene_mass.png").stat().st_size > 10_000
    again = run(prune_cfg(f"data.corpus=[{oversampled_corpus}]", "selection.mass=auto", "ratio=0.7",
                          run_dir=tmp_path / "again"), progress=False)
    assert (read_manifest(tmp_path / "again").selected == read_manifest(tmp_path / "auto").selected).all()


@pytest.mark.parametrize("bad", ["selection.mass=balanced", "selection.volume.k=1", "selection.volume.dim=-2",
                                 "selection.volume.dim=high", "selection.volume.min_stratum=0"])
def test_bad_volume_values_are_usage_errors(prune_cfg, tmp_path, bad):
    with pytest.raises(UsageError):
        run(prune_cfg(bad, run_dir=tmp_path / "r"), progress=False)
