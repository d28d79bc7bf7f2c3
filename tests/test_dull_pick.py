"""`selection.dull_z`: members much less sharp than their cluster are picked last.

Real AID tiles, scored by the real stage-1 scan, with blurred copies made as the raw corpus
makes its blur kind (a Gaussian blur of the whole tile)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from conftest import DATA
from prune.index import scan_file
from prune.methods.rsprune import dull_members, pick_clusters
from rsprune.cli import compose
from rsprune.encoders import build_encoder, embed_paths
from rsprune.imageio import list_images

BLUR = 5  # blurred copies per class


def tiles(tmp_path, cls: str, n: int = 30) -> list:
    """n real tiles of an AID class, then BLUR blurred copies of its first ones."""
    src = [DATA / "aid" / cls / f for f in sorted(list_images(DATA / "aid" / cls))[:n]]
    out = []
    for i, p in enumerate(src[:BLUR]):
        q = tmp_path / f"{cls}-blur{i}.png"
        Image.open(p).convert("RGB").filter(ImageFilter.GaussianBlur(2.5)).save(q)
        out.append(q)
    return src + out


def sharpness(paths) -> np.ndarray:
    e = compose("prune").entropy
    return np.array([scan_file(str(p), e.grid, e.max_side, (e.area_grid, e.flat_bits, e.bright))["entropy_sharpness"]
                     for p in paths])


def test_blurred_copies_are_dull_against_their_own_cluster_not_the_corpus(tmp_path):
    """Beach and desert (a smooth scene) tiles, each with blurred copies, in one cluster each:
    every blurred copy is dull at the default z; most real tiles are not. Measured against one
    corpus-wide group instead, the smooth desert tiles would be taken for blur."""
    z = float(compose("prune").selection.dull_z)
    paths = tiles(tmp_path, "Beach") + tiles(tmp_path, "Desert")
    sharp = sharpness(paths)
    n = len(paths) // 2
    cluster = np.repeat([0, 1], n)
    blurred = np.tile(np.r_[np.zeros(n - BLUR, bool), np.ones(BLUR, bool)], 2)
    dull = dull_members(cluster, sharp, z)
    print(f"z {z}: dull blurred {dull[blurred].mean():.2f}, dull real {dull[~blurred].mean():.2f}")
    assert dull[blurred].all()
    assert dull[~blurred].mean() <= 0.4
    pooled = dull_members(np.zeros(len(paths), np.int64), sharp, z)
    desert_real = (cluster == 1) & ~blurred
    assert pooled[desert_real].sum() > dull[desert_real].sum()


def test_dull_members_are_picked_last_and_the_quota_is_still_exact(tmp_path):
    """A cluster of real beach tiles and their blurred copies: with the dull rule the spread pick
    takes no blurred copy while sharp members remain, and a quota larger than the sharp members
    is filled exactly, dull ones last. Without the rule (late=None) the same call is the plain
    spread pick."""
    from prune.selection import pick

    paths = tiles(tmp_path, "Beach")
    enc = build_encoder(compose("prune").encoder)
    emb = embed_paths(enc, paths, 64, 1, progress=False).astype(np.float32)
    centroid = emb.mean(0) / np.linalg.norm(emb.mean(0))
    dist, ids, cluster = 1 - emb @ centroid, np.arange(len(paths)), np.zeros(len(paths), np.int64)
    late = dull_members(cluster, sharpness(paths), float(compose("prune").selection.dull_z))
    blurred = np.arange(len(paths)) >= len(paths) - BLUR
    assert late[blurred].all()
    for quota in (4, 10, int((~late).sum())):
        got, _ = pick_clusters(emb, dist, ids, cluster, {0: quota}, "spread", 0.95, None, 1.0, late)
        assert len(got) == quota and not late[got].any()
    over = int((~late).sum()) + 2
    got, _ = pick_clusters(emb, dist, ids, cluster, {0: over}, "spread", 0.95, None, 1.0, late)
    assert len(np.unique(got)) == over and late[got].sum() == 2 and (~late[got]).sum() == over - 2
    plain, _ = pick_clusters(emb, dist, ids, cluster, {0: 10}, "spread", 0.95, None, 1.0, None)
    assert plain.tolist() == pick(emb, dist, ids, 10, "spread", 0.95, None)[0].tolist()
