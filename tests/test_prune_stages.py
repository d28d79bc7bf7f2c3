"""Each pruning stage as a pure function, on real shared images."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

from conftest import DATA
from prune.budget import budget, waterfill
from prune.cluster import cluster_stratum
from prune.entropy import entropies, entropy_filter, global_entropy, histogram_entropy, local_entropy
from prune.index import scan_file
from prune.methods.rsprune import cluster_quotas
from prune.scenes import assign_scenes, reference_labels
from prune.selection import pick
from rsprune.cli import compose
from rsprune.encoders import build_encoder, embed_paths
from rsprune.imageio import grey, list_images, load_grey, load_rgb


def real_image(name="aid/Beach/beach_1.jpg") -> np.ndarray:
    return load_rgb(DATA / name)


def test_entropy_of_constant_is_zero_and_of_uniform_noise_near_8_bits():
    flat = np.full((128, 128), 117, np.uint8)
    assert global_entropy(flat) == 0.0
    assert local_entropy(flat, 4) == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    assert 7.99 < global_entropy(noise) <= 8.0
    assert 7.9 < local_entropy(noise, 4) <= 8.0  # 16 patches of 16k pixels each


def test_local_entropy_sees_half_clouded_tile_that_global_misses():
    g = grey(real_image())
    clouded = g.copy()
    clouded[:, 64:] = 250  # the right half under a flat cloud
    # The mixed histogram keeps more of the global score (the cloud adds a bin of its own),
    # while local entropy falls with the share of flat patches: half of them score zero.
    g_ratio = global_entropy(clouded) / global_entropy(g)
    l_ratio = local_entropy(clouded, 4) / local_entropy(g, 4)
    assert l_ratio < 0.55 and l_ratio < g_ratio - 0.1, (g_ratio, l_ratio)


def test_blank_and_cloud_tiles_are_dropped_by_stage_1(tmp_path):
    """Real images plus a blank tile and a cloud-like tile, scored and cut with the real config."""
    cfg = compose("prune")
    rng = np.random.default_rng(0)
    paths = [DATA / "aid" / c / f for c in ("Farmland", "Forest", "Industrial", "Desert") for f in
             sorted(list_images(DATA / "aid" / c))[:25]]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128, 3), 20, np.uint8)).save(blank)  # no-data / dark sea
    cloud = tmp_path / "cloud.png"  # smooth bright blob with faint sensor noise
    yy, xx = np.mgrid[:128, :128]
    c = 235 + 15 * np.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / 3000) + rng.normal(0, 1.0, (128, 128))
    Image.fromarray(np.repeat(np.clip(c, 0, 255).astype(np.uint8)[:, :, None], 3, 2)).save(cloud)
    e = cfg.entropy
    rows = [scan_file(str(p), e.grid, e.max_side, (e.area_grid, e.flat_bits, e.bright)) for p in paths + [blank, cloud]]
    score = np.array([r["entropy_local"] for r in rows])
    area = np.array([r["entropy_area"] for r in rows])
    sharp = np.array([r["entropy_sharpness"] for r in rows])
    kept, cut = entropy_filter(score, np.ones(len(rows), bool), e.floor, e.percentile, area, e.min_area, sharp,
                               e.min_sharpness)
    assert not kept[-1] and not kept[-2], f"blank/cloud not dropped: scores {score[-2:]}, area {area[-2:]}, cut {cut}"
    assert kept[:-2].mean() >= 0.9  # real scenes survive


def test_band_rule_on_modes_made_from_a_real_image(tmp_path):
    rgb = real_image()
    im = Image.fromarray(rgb)
    im.convert("L").save(tmp_path / "grey.png")
    im.convert("P", palette=Image.ADAPTIVE, colors=64).save(tmp_path / "palette.png")
    im.convert("RGBA").save(tmp_path / "rgba.png")
    g16 = (grey(rgb).astype(np.uint16) * 16)  # a 12-bit sensor's range in a 16-bit PNG
    Image.fromarray(g16).save(tmp_path / "grey16.png")
    import tifffile

    four = np.concatenate([rgb, grey(rgb)[:, :, None]], axis=2)  # R, G, B, NIR
    tifffile.imwrite(tmp_path / "four_band.tif", four)
    assert (load_rgb(tmp_path / "grey.png") == grey(rgb)[:, :, None]).all()
    pal = load_rgb(tmp_path / "palette.png")
    assert pal.shape == rgb.shape and np.abs(pal.astype(int) - rgb).mean() < 12
    assert (load_rgb(tmp_path / "rgba.png") == rgb).all()  # alpha dropped, never composited
    assert (load_rgb(tmp_path / "four_band.tif") == rgb).all()  # first three bands are RGB
    g = load_rgb(tmp_path / "grey16.png")
    assert g.shape == rgb.shape and g.min() == 0 and g.max() == 255  # stretched, not left dark
    assert np.corrcoef(g[:, :, 0].ravel(), grey(rgb).ravel())[0, 1] > 0.99
    # The index pass's grey decode (a C fast path for RGB and L) is the grey of the band rule...
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    bands = {"rgb.png": 3, "grey.png": 1, "palette.png": 3, "rgba.png": 4, "grey16.png": 1, "four_band.tif": 4}
    for name, n in bands.items():
        g, b, hw = load_grey(tmp_path / name)
        assert b == n and hw == rgb.shape[:2] and g.dtype == np.uint8, name
        assert (g == grey(load_rgb(tmp_path / name))).all(), name


def test_jpeg_luma_decode_matches_grey_of_rgb_and_shrinks_big_tiles(tmp_path):
    """...and a JPEG's stored luma plane, decoded alone, is that grey up to chroma rounding."""
    src = DATA / "aid" / "Beach" / "beach_1.jpg"
    g, b, hw = load_grey(src)
    ref = grey(load_rgb(src))
    d = np.abs(g.astype(int) - ref)  # RGB clipping of saturated pixels moves a few by more
    assert b == 3 and hw == ref.shape and d.mean() < 0.05 and (d > 1).mean() < 0.01, (d.mean(), (d > 1).mean())
    assert abs(local_entropy(g) - local_entropy(ref)) < 0.05
    big = np.array(Image.fromarray(load_rgb(src)).resize((2000, 1500), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    g, b, hw = load_grey(tmp_path / "big.jpg", max_side=512)  # DCT 1/2 then resize to 512
    ref = np.asarray(Image.fromarray(grey(big)).resize((512, 384), Image.BILINEAR))
    assert hw == (1500, 2000) and g.shape == (384, 512)
    assert abs(local_entropy(g) - local_entropy(ref)) < 0.1, (local_entropy(g), local_entropy(ref))


def test_one_bincount_entropies_equal_the_reference_histograms():
    files = [DATA / "aid" / c / sorted(list_images(DATA / "aid" / c))[0] for c in ("Beach", "Desert", "Forest")]
    big = np.tile(grey(load_rgb(files[1])), (9, 8))  # 1152 x 1024 px: past the c*log2(c) table
    for g in [grey(load_rgb(f)) for f in files] + [grey(load_rgb(files[0]))[:37, :91], big]:
        h, w = g.shape
        r, c = (np.linspace(0, n, 5).round().astype(int) for n in (h, w))  # cuts at rounded H/4, W/4
        patches = [g[r[i]:r[i + 1], c[j]:c[j + 1]] for i in range(4) for j in range(4)]
        ref_local = np.mean([histogram_entropy(np.bincount(p.ravel(), minlength=256)) for p in patches])
        ref_global = histogram_entropy(np.bincount(g.ravel(), minlength=256))
        assert np.allclose(entropies(g, 4), (ref_global, ref_local), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
def test_budget_split_is_exact(ratio):
    rng = np.random.default_rng(int(ratio * 100))
    n = 18_400
    b = budget(n, ratio)
    assert b == round((1 - ratio) * n)
    scene = rng.choice(30, n, p=rng.dirichlet(np.ones(30) * 0.5))
    cluster = scene * 100 + rng.integers(0, 1 + rng.integers(1, 60, 30)[scene])
    q = cluster_quotas(scene, cluster, b, 0.5)
    assert sum(q.values()) == b
    sizes = dict(zip(*np.unique(cluster, return_counts=True)))
    assert all(q[c] <= sizes[c] for c in q)


def test_waterfill_gives_small_groups_all_they_have():
    cap = np.array([2, 50, 3, 100, 0])
    a = waterfill(cap, np.ones(5), 60)
    assert a.sum() == 60 and a[0] == 2 and a[2] == 3 and a[4] == 0
    assert abs(a[1] - a[3]) <= 1  # the rest split evenly among the large ones
    assert waterfill(cap, np.ones(5), 10_000).tolist() == cap.tolist()  # budget over capacity: all
    w = waterfill(np.array([1000, 1000]), np.array([3.0, 1.0]), 400)
    assert w.tolist() == [300, 100]  # proportional when nobody saturates


def test_pick_skips_near_duplicates_but_fills_quota():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 16))
    emb = np.concatenate([base, base[:2] + 1e-4])  # rows 5, 6 near-copies of rows 0, 1
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.array([0.1, 0.2, 0.5, 0.6, 0.7, 0.11, 0.21])
    ids = np.array([f"{i:02d}" for i in range(7)])
    got, dup = pick(emb, dist, ids, 4, "nearest", 0.95, rng)
    assert sorted(got.tolist()) == [0, 1, 2, 3] and sorted(dup.tolist()) == [5, 6]
    got, _ = pick(emb, dist, ids, 7, "nearest", 0.95, rng)
    assert len(got) == 7  # quota = cluster size: everything, duplicates included
    for mode in ("spread", "cover", "random"):
        got, _ = pick(emb, dist, ids, 3, mode, 0.95, rng)
        assert len(set(got.tolist())) == 3


@functools.lru_cache(maxsize=1)
def aid_embeddings():
    """Default-encoder embeddings of 20 + 10 AID images per class (900): (ref paths, test paths, emb)."""
    enc = build_encoder(compose("prune").encoder)
    ref_paths, test_paths = [], []
    for c in sorted(p.name for p in (DATA / "aid").iterdir() if p.is_dir()):
        files = list_images(DATA / "aid" / c)
        ref_paths += [f"{c}/{f}" for f in files[:20]]
        test_paths += [f"{c}/{f}" for f in files[-10:]]
    return ref_paths, test_paths, embed_paths(enc, [DATA / "aid" / p for p in ref_paths + test_paths], 64, 1,
                                              progress=False)


def test_scene_assignment_agrees_with_held_out_aid_labels():
    """Prototypes from 20 AID images per class; 10 held-out images per class are assigned."""
    ref_paths, test_paths, emb = aid_embeddings()
    labels, classes = reference_labels(ref_paths)
    truth, _ = reference_labels(test_paths)
    scene, sim = assign_scenes(emb[len(ref_paths):], emb[:len(ref_paths)], labels, threshold=-1.0)
    acc = (scene == truth).mean()
    print(f"held-out AID scene accuracy (nearest class mean, 30 classes): {acc:.3f}")
    assert acc > 0.5, acc  # chance is 1/30
    knn, _ = assign_scenes(emb[len(ref_paths):], emb[:len(ref_paths)], labels, mode="knn", knn=10, threshold=-1.0)
    print(f"held-out AID scene accuracy (10-NN vote): {(knn == truth).mean():.3f}")
    assert (knn == truth).mean() > 0.5


def test_refine_step_closes_most_of_the_sample_fit_gap_on_real_embeddings():
    """k-means fitted on 10% of 900 real AID embeddings, then one Lloyd step over all of them."""
    emb = aid_embeddings()[2]
    objective = {}
    for refine in (0, 1):
        label, dist, centroids = cluster_stratum(emb, 30, 0.1, 0, 20, 0, refine)
        assert label.shape == (900,) and centroids.shape == (30, emb.shape[1])
        assert np.allclose(1 - dist, (emb * centroids[label]).sum(1), atol=1e-4)  # distances to own centroid
        objective[refine] = float(dist.sum())
    full = float(cluster_stratum(emb, 30, 1.0, 0, 20, 0, 1)[1].sum())  # fitted on all: nothing to refine
    gap0, gap1 = objective[0] / full - 1, objective[1] / full - 1
    print(f"objective vs full fit: sample {1 + gap0:.3f}, sample + 1 refine step {1 + gap1:.3f}")
    assert gap1 < 0.5 * gap0, (gap0, gap1)


def test_cover_pick_covers_a_real_cluster_better_than_spread_and_takes_an_outlier_later():
    """A cluster of 30 real AID beach embeddings and one farmland image. Facility location
    (cover) reaches at least the spread pick's coverage (sum over members of the similarity to
    the nearest chosen) at every quota, starts near the centroid, and takes the far outlier
    later than the spread pick, whose second choice it is."""
    from prune.selection import candidate_order

    ref_paths, test_paths, emb = aid_embeddings()
    paths = ref_paths + test_paths
    beach = [i for i, p in enumerate(paths) if p.startswith("Beach/")]
    farm = next(i for i, p in enumerate(paths) if p.startswith("Farmland/"))
    x = emb[beach + [farm]].astype(np.float32)
    centroid = x[:-1].mean(0) / np.linalg.norm(x[:-1].mean(0))
    dist, ids = 1 - x @ centroid, np.arange(len(x))
    covered = lambda got: float(np.maximum(x @ x[got].T, 0).max(1).sum())
    for quota in range(1, 11):
        spread, cover = (pick(x, dist, ids, quota, m, 0.95, None)[0] for m in ("spread", "cover"))
        assert len(set(cover.tolist())) == quota
        assert covered(cover) >= covered(spread) - 1e-5, quota
    spread_at, cover_at = (candidate_order(x, dist, ids, m, None).tolist().index(30) for m in ("spread", "cover"))
    assert spread_at == 1 and cover_at > spread_at, (spread_at, cover_at)
    first = pick(x, dist, ids, 1, "cover", 0.95, None)[0][0]
    assert dist[first] <= np.quantile(dist[:-1], 0.25)


@pytest.mark.parametrize("mode", ["spread", "cover"])
def test_greedy_pick_from_a_truncated_order_equals_the_full_one(mode):
    """pick() walks only the first `quota` positions of a greedy order (farthest point, facility
    location) unless near-duplicates were skipped; the result must equal walking the whole
    order, duplicates or not."""
    from prune.selection import candidate_order, pick

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 16))
    x[30:45] = x[:15] + 0.01 * rng.standard_normal((15, 16))  # near-duplicate pairs
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist, ids = rng.random(60), np.arange(60)
    for quota in (1, 5, 20, 44, 59):
        for dedup in (0.95, 1.0):
            order = candidate_order(x, dist, ids, mode, None)
            taken, skipped = [], []
            for i in order:
                if len(taken) == quota:
                    break
                (skipped if dedup < 1 and taken and (x[taken] @ x[i]).max() >= dedup else taken).append(i)
            want = taken + skipped[:quota - len(taken)]
            got, dup = pick(x, dist, ids, quota, mode, dedup, None)
            assert got.tolist() == want and dup.tolist() == skipped[quota - len(taken):]
