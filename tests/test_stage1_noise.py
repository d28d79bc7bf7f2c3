"""Stage 1 sees what a mean of patch entropies cannot: cut and clouded area, blur; real homogeneous scenes pass."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import DATA
from prune.entropy import coverage_sharpness, entropies, entropy_filter
from rsprune import rawcorpus

MIN_AREA, MIN_SHARP = 0.8, 3.2  # configs/prune.yaml defaults


def grey(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).convert("L"))


def tiles(cls: str, n: int = 12) -> list[np.ndarray]:
    files = sorted((DATA / "aid" / cls).iterdir())[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def test_noise_kinds_fail_and_their_clean_tiles_pass():
    rng = np.random.default_rng(0)
    clean = tiles("Farmland") + tiles("Forest")
    for a in clean:
        area, sharp = coverage_sharpness(grey(a))
        assert area >= MIN_AREA and sharp >= MIN_SHARP
    fails = {"cloud_opaque": 0, "nodata_wedge": 0, "blur": 0}
    for a in clean:
        g_cloud = grey(rawcorpus.cloud(a, rng, 0.8, 1.0))
        g_wedge = grey(rawcorpus.wedge(a, rng, 0.5))
        g_blur = grey(np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(3.0))))
        fails["cloud_opaque"] += coverage_sharpness(g_cloud)[0] < MIN_AREA
        fails["nodata_wedge"] += coverage_sharpness(g_wedge)[0] < MIN_AREA
        fails["blur"] += coverage_sharpness(g_blur)[1] < MIN_SHARP
        # the mean of patch entropies barely moves for a blurred tile: that is why it is not enough
    assert all(v >= 0.8 * len(clean) for v in fails.values()), fails


@pytest.mark.parametrize("cls", ["Desert", "BareLand", "Meadow"])
def test_real_homogeneous_scenes_mostly_pass(cls):
    imgs = tiles(cls, 40)
    g = [grey(a) for a in imgs]
    local = np.array([entropies(x, 4)[1] for x in g])
    cov = np.array([coverage_sharpness(x) for x in g])
    keep, _ = entropy_filter(local, np.ones(len(g), bool), 2.5, 0.0, cov[:, 0], MIN_AREA, cov[:, 1], MIN_SHARP)
    assert keep.mean() >= 0.8, (cls, keep.mean())  # Desert 0.825 measured; the old 5th-percentile cut lost ~half of AID Desert


def test_checks_off_keep_the_old_filter():
    s = np.array([1.0, 3.0, 5.0])
    area, sharp = np.array([0.1, 0.2, 0.3]), np.array([0.0, 1.0, 2.0])
    keep, cut = entropy_filter(s, np.ones(3, bool), 2.0, 0.0, area, 0.0, sharp, None)
    assert keep.tolist() == [False, True, True] and cut == 2.0
    keep, _ = entropy_filter(s, np.ones(3, bool), 2.0, 0.0, area, 0.25, sharp, 1.5)
    assert keep.tolist() == [False, False, True]


def test_core_keeps_the_pick_among_the_central_members():
    from prune.selection import pick

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    dist = rng.random(40)
    ids = np.array([f"{i:02d}" for i in range(40)])
    central = set(np.argsort(dist)[:20].tolist())
    got, _ = pick(emb, dist, ids, 10, "spread", 1.0, np.random.default_rng(1), core=0.5)
    assert len(got) == 10 and set(got.tolist()) <= central
    full, _ = pick(emb, dist, ids, 10, "spread", 1.0, np.random.default_rng(1), core=1.0)
    assert not set(full.tolist()) <= central  # the plain spread pick reaches the edge
    many, _ = pick(emb, dist, ids, 30, "spread", 1.0, np.random.default_rng(1), core=0.5)
    assert len(many) == 30  # a quota beyond the core is still met exactly
