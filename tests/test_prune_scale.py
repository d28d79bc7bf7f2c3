"""What keeps the single-process path whole at large N, on real embeddings and real runs:
no silent cap on the cluster count, streamed cache keys, a float16 pool, summary counts, the
store's float16 rows held as they are, kept.txt written a chunk at a time."""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd

from conftest import DATA
from prune import methods
from prune.cluster import member_means, split_strata, stratified_clusters
from prune.outputs import group_counts
from prune.run import run
from prune.volume import intrinsic_dim, image_volumes, neighbour_distances, neighbour_stats
from rsprune.cache import rows_digest, save_npy, write_lines
from rsprune.cli import compose
from rsprune.embed_store import gather, shard_plan
from rsprune.encoders import build_encoder, embed_paths
from rsprune.imageio import list_images
from rsprune.manifest import read_manifest
from rsprune.columns import fixed_text
from rsprune.unit_rows import UnitRows, pool_rows


@functools.lru_cache(maxsize=1)
def aid_600() -> np.ndarray:
    """Default-encoder embeddings of 20 real AID images per class (600, float32, unit rows)."""
    paths = [DATA / "aid" / c / f for c in sorted(p.name for p in (DATA / "aid").iterdir() if p.is_dir())
             for f in list_images(DATA / "aid" / c)[:20]]
    return embed_paths(build_encoder(compose("prune").encoder), paths, 64, 1, progress=False)


def clustering(**over):
    cfg = compose("prune", ["clustering.cluster_size=10", "clustering.min_sample=50",
                            *[f"clustering.{k}={'null' if v is None else v}" for k, v in over.items()]])
    return cfg.clustering


def test_a_stratum_past_max_k_is_split_into_cells_not_capped():
    """600 rows at 10 per cluster need 60 clusters; one k-means may fit 15: the stratum is split
    into 4 cells and still gets about 60 clusters of about 10 (a cap gave 15 of 40)."""
    emb = aid_600()
    strata = np.zeros(len(emb), np.int64)
    assert split_strata(strata, clustering(max_k=15)) == {0: 60}
    assert split_strata(strata, clustering(max_k=None)) == {}
    cluster, dist, info, cent = stratified_clusters(emb, strata, clustering(max_k=15), 0, with_centroids=True)
    k = len(info)
    assert 55 <= k <= 65, k  # each cell's share is rounded
    assert len(cent) == k and cluster.min() == 0 and cluster.max() == k - 1
    assert np.allclose(1 - dist, (emb * cent[cluster]).sum(1), atol=1e-4)  # each row: its own centroid
    assert sum(size for _, _, size in info) == len(emb)
    assert len(np.unique(cluster)) > 40  # a cap at 15 could never reach this
    flat, _, flat_info = stratified_clusters(emb, strata, clustering(max_k=None), 0)
    assert len(flat_info) == 60
    # Under max_k nothing changes: the same labels as an uncapped flat fit.
    assert np.array_equal(stratified_clusters(emb, strata, clustering(max_k=4096), 0)[0], flat)


def test_rows_digest_sees_every_row_and_the_row_boundaries():
    ids = [f"{i:016x}" for i in range(1000)]
    base = rows_digest(ids, np.arange(1000))
    assert base == rows_digest(np.asarray(ids, object), pd.Series(np.arange(1000)))  # list, array, Series
    assert base == rows_digest(ids, np.arange(1000), chunk=7)  # chunking is invisible
    assert base == rows_digest(pd.Series(ids), np.arange(1000), chunk=7)  # a text Series, a chunk at a time
    changed = ids.copy()
    changed[537] = changed[537][:-1] + "x"
    assert rows_digest(changed, np.arange(1000)) != base
    assert rows_digest(ids, np.r_[np.arange(999), 5]) != base
    assert rows_digest(["ab", "c"]) != rows_digest(["a", "bc"])  # boundaries count
    assert rows_digest(["1", "2"]) != rows_digest(np.array([1, 2]))  # text is not a number
    assert rows_digest(ids, np.arange(1000)) != rows_digest(np.arange(1000), ids)  # column order counts


def test_a_float16_pool_selects_what_its_float32_widening_selects():
    """The store holds float16; the selection widens one cluster at a time and must choose
    exactly what it chooses on the whole pool widened at once."""
    emb32 = aid_600()
    emb16 = emb32.astype(np.float16)
    wide = emb16.astype(np.float32)
    scene = np.repeat(np.arange(30), 20) % 7  # 7 strata of mixed classes
    cfg = compose("prune", ["+experiment=ratio85", "clustering.cluster_size=10", "clustering.min_sample=50"])
    cluster, dist, _ = stratified_clusters(wide, scene, cfg.clustering, 0)
    chosen = {}
    for name, e in (("f16", emb16), ("f32", wide)):
        ids = np.char.mod("%016x", np.arange(len(e))).astype(object)
        sharp = np.random.default_rng(1).normal(4.0, 0.5, len(e))  # stage 1's reading, for selection.dull_z
        pool = methods.Pool(pd.DataFrame({"id": ids, "entropy_sharpness": sharp}), emb=e, scene=scene, cluster=cluster,
                            dist=dist)
        got, _ = methods.get("rsprune").select(pool, 90, cfg, np.random.default_rng(0))
        chosen[name] = np.sort(got)
    assert len(chosen["f16"]) == 90
    assert np.array_equal(chosen["f16"], chosen["f32"])


def test_summary_counts_equal_the_manifest_counted_row_by_row(prune_cfg, tmp_path):
    run(prune_cfg(run_dir=tmp_path / "r"), progress=False)
    m = read_manifest(tmp_path / "r")
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    usable = (m.readable & (m.duplicate_of == "")).to_numpy()
    per_scene, per_cluster = {}, {}
    for row, ok in zip(m.itertuples(), usable):
        for table, key, take in ((per_scene, row.scene_name, ok), (per_cluster, str(row.cluster), row.cluster >= 0)):
            if take:
                c = table.setdefault(key, {"found": 0, "stage1_kept": 0, "selected": 0})
                c["found"] += 1
                c["stage1_kept"] += int(row.stage1_kept)
                c["selected"] += int(row.selected)
    assert s["per_scene"] == per_scene
    assert {int(k): v for k, v in s["per_cluster"].items()} == {int(k): v for k, v in per_cluster.items()}
    assert list(s["per_scene"]) == sorted(s["per_scene"])  # in sorted key order, as before
    assert s["reasons"] == m.reason.value_counts().to_dict()
    assert s["counts"]["selected"] == int(m.selected.sum()) == round(0.15 * len(m))


def test_the_pool_holds_the_stores_float16_rows_and_reads_the_bits_gather_widens(tmp_path):
    """A float16 store gathered as stored is half the bytes of the float32 gather, and every
    way a stage indexes it (a cluster's rows, a slice, a mask, the whole matrix) gives the bits
    that the float32 gather gives; the selection on it is the same."""
    emb = aid_600()
    hashes = [f"{i * 7919:040x}" for i in range(len(emb))]  # sorted: the store's order
    plan = shard_plan(hashes, 256, "k")
    assert len(plan) == 3
    for (k, h), start in zip(plan, (0, 256, 512)):
        save_npy(tmp_path / f"{k}.ids.npy", np.asarray(h), checksum=True)
        save_npy(tmp_path / f"{k}.npy", emb[start:start + len(h)].astype(np.float16), checksum=True)
    rng = np.random.default_rng(0)
    want = [hashes[i] for i in rng.permutation(len(hashes))]  # pool order is not store order
    wide = gather(plan, tmp_path, want)
    raw = gather(plan, tmp_path, want, widen=False)
    assert raw.dtype == np.float16 and 2 * raw.nbytes == wide.nbytes
    rows = pool_rows(raw)
    assert isinstance(rows, UnitRows) and rows.shape == wide.shape and len(rows) == len(wide)
    assert pool_rows(wide) is wide  # float32 storage: as gathered
    for pick in (np.sort(rng.choice(len(wide), 37, replace=False)), slice(100, 400), wide[:, 0] > 0):
        assert rows[pick].dtype == np.float32 and np.array_equal(rows[pick], wide[pick])
    assert np.array_equal(np.asarray(rows), wide)
    scene = np.repeat(np.arange(30), 20) % 7
    cfg = compose("prune", ["+experiment=ratio85", "clustering.cluster_size=10", "clustering.min_sample=50"])
    chosen = []
    for e in (wide, rows):
        cluster, dist, _ = stratified_clusters(e, scene, cfg.clustering, 0)
        ids = np.char.mod("%016x", np.arange(len(e))).astype(object)
        sharp = np.random.default_rng(1).normal(4.0, 0.5, len(e))  # stage 1's reading, for selection.dull_z
        pool = methods.Pool(pd.DataFrame({"id": ids, "entropy_sharpness": sharp}), emb=e, scene=scene, cluster=cluster,
                            dist=dist)
        chosen.append(methods.get("rsprune").select(pool, 90, cfg, np.random.default_rng(0)))
    assert np.array_equal(chosen[0][0], chosen[1][0]) and chosen[0][1] == chosen[1][1]


def test_kept_lines_written_in_chunks_are_the_joined_text(tmp_path):
    paths = [f"/data/scène {i:03d}/tile.jpg" for i in range(10)]
    write_lines(tmp_path / "kept.txt", paths, chunk=3)
    assert (tmp_path / "kept.txt").read_bytes() == "".join(p + "\n" for p in paths).encode()
    write_lines(tmp_path / "empty.txt", [])
    assert (tmp_path / "empty.txt").read_bytes() == b""


def test_member_means_of_a_float16_stratum_in_chunks_are_the_bits_of_one_product():
    """The Lloyd update widens 16k rows at a time; each chunk continues the sums, so a chunk of
    7 rows gives exactly what one sparse product over the stratum widened at once gives."""
    import scipy.sparse as sp

    x = aid_600().astype(np.float16)
    label = np.random.default_rng(0).integers(0, 25, len(x))
    label[label == 3] = 4  # a centroid without members keeps its place
    cent = np.eye(25, x.shape[1], dtype=np.float32)
    sums = np.asarray(sp.csr_matrix((np.ones(len(x), np.float32), (label, np.arange(len(x)))), shape=(25, len(x)))
                      @ x.astype(np.float32))
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    want = np.where(norm > 0, sums / np.maximum(norm, 1e-12), cent).astype(np.float32)
    for chunk in (7, 256, 1 << 14):
        assert np.array_equal(member_means(x, label, cent, chunk), want)
    assert np.array_equal(member_means(x, label, cent)[3], cent[3])


def test_neighbour_distances_are_float32_and_give_the_float64_volumes():
    """The (N, k) distances are held as float32 (half the bytes); they are the similarities' own
    precision, so the dimension and volumes equal those computed on a float64 copy."""
    emb = aid_600()
    cluster = np.repeat(np.arange(60), 10)
    d = neighbour_distances(emb, cluster, 5)
    assert d.dtype == np.float32 and np.isfinite(d).all()
    wide = d.astype(np.float64)
    assert intrinsic_dim(d) == intrinsic_dim(wide)
    assert np.array_equal(image_volumes(d, 4.0), image_volumes(wide, 4.0))
    inv, r = neighbour_stats(emb, cluster, 5)
    assert inv.dtype == r.dtype == np.float64 and np.array_equal(r, np.nanmean(wide, axis=1))


def test_group_counts_by_name_merge_keys_that_share_a_name_and_sort_by_name():
    key = np.array([5, -1, 5, 2, 2, 7, -2])
    names = np.array(["b", "unmatched", "b", "a", "a", "b", ""], object)
    kept1 = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    sel = np.array([1, 0, 0, 1, 0, 1, 0], bool)
    got = group_counts(key, kept1, sel, name_of=lambda rows: names[rows])
    assert list(got) == ["", "a", "b", "unmatched"]
    assert got["b"] == {"found": 3, "stage1_kept": 2, "selected": 2}  # keys 5 and 7
    assert got["a"] == {"found": 2, "stage1_kept": 2, "selected": 1}
    by_key = group_counts(key, kept1, sel)
    assert list(by_key) == ["-2", "-1", "2", "5", "7"] and by_key["5"] == {"found": 2, "stage1_kept": 1, "selected": 1}
    assert group_counts(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool)) == {}


def test_the_pools_ids_are_fixed_width_bytes_that_select_as_the_strings_do(prune_cfg, tmp_path):
    """A real manifest's ids read as 'S16' over the table's own buffer (no Python string per
    row); a column that is not one ASCII width stays strings; ties break by these ids exactly
    as by the strings, and the pool hands them to the methods."""
    run(prune_cfg(run_dir=tmp_path / "r"), progress=False)
    m = read_manifest(tmp_path / "r")
    ids = fixed_text(m.id)
    assert ids.dtype == np.dtype("S16") and ids.astype("U16").tolist() == m.id.tolist()
    assert fixed_text(m.iloc[5:50].id).astype("U16").tolist() == m.id.iloc[5:50].tolist()
    assert fixed_text(m.content_hash).dtype == np.dtype("S40")
    assert fixed_text(m.path).dtype == object  # paths differ in length
    assert fixed_text(pd.Series(["ab", "é!"])).dtype == object  # not ASCII
    assert np.array_equal(np.argsort(ids, kind="stable"), np.argsort(m.id.to_numpy(), kind="stable"))
    strings = m.id.to_numpy(dtype=object)
    tied = np.arange(len(m)) % 3  # ties in the distance: the id decides, as pick's lexsort does
    assert np.array_equal(np.lexsort((ids, tied)), np.lexsort((strings, tied)))
    pool = methods.Pool(m)
    assert pool.ids.dtype == np.dtype("S16") and pool.ids.astype("U16").tolist() == strings.tolist()
