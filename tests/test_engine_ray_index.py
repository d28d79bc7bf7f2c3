"""engine=ray runs the index + entropy pass and the embedding pass as Ray Data operations on a
local 2-CPU cluster, and writes what one process writes: the same index tables (ids, hashes,
entropy scores, unreadable and duplicate marks), the same entropy cut, the same float16 store
files, the same kept.txt; a rerun with some of its partitions, shards and tables gone
finishes to the same outputs. The corpus: 240 real NWPU images, one exact byte copy of one of
them and one truncated JPEG; the reference: 300 real AID images."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import DATA, link_images, shrunk_overrides
from prune.run import run
from rsprune.cli import compose

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = link_images(tmp_path_factory.mktemp("dirty") / "nwpu", DATA / "nwpu12" / "train", 20)
    first = sorted((root / "beach").iterdir())[0]
    shutil.copyfile(first, root / "wetland" / "copy_of_beach.jpg")  # exact bytes, another name
    (root / "lake" / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    return root


def overrides(corpus, reference, base, name, scenes):
    # 4 index shards of 64 in 2 partitions, 2 encoder batches a shard, and a cut set by the
    # corpus percentile (above the floor), so that every Ray step has several tasks.
    over = shrunk_overrides(corpus, reference, base / name / "run", base / name / "cache", "index.shard_size=64",
                            "index.partition_rows=128", "entropy.percentile=30", "entropy.floor=0",
                            "encoder.batch_size=64", f"scenes.assign={scenes}")
    return [o for o in over if scenes != "folder" or not o.startswith("data.reference=")]


def outputs(base, name) -> dict:
    cache = base / name / "cache"
    return {"kept": (base / name / "run" / "kept.txt").read_bytes(),
            "summary": json.loads((base / name / "run" / "summary.json").read_text()),
            "tables": {p.name: pd.read_parquet(p) for p in sorted((cache / "index").glob("*.parquet"))},
            "store": {p.name: p.read_bytes() for p in sorted((cache / "embed").glob("*/*.npy"))}}


# The corpus's class folders as strata (only the corpus indexed and embedded), and scenes
# against the AID reference (its 300 images indexed and embedded too). Slow: 56-72 s each on 2 quiet
# cores (3 min while other jobs ran), Ray start-up, shuffle and actor start-up included (BENCHMARKS.md).
@pytest.mark.slow
@pytest.mark.parametrize("scenes", ["folder", "prototype"])
def test_ray_index_and_embedding_write_what_one_process_writes(local_ray, corpus, small_reference, tmp_path, scenes):
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a one-CPU Ray task runs with
    try:
        with threadpool_limits(1):
            run(compose("prune", overrides(corpus, small_reference, tmp_path, "local", scenes)), progress=False)
    finally:
        torch.set_num_threads(threads)
    run(compose("prune", overrides(corpus, small_reference, tmp_path, "ray", scenes) + ["engine=ray"]), progress=False)
    one, on_ray = outputs(tmp_path, "local"), outputs(tmp_path, "ray")

    n_sets = 1 if scenes == "folder" else 2  # the corpus, and the reference
    assert list(on_ray["tables"]) == list(one["tables"]) and len(one["tables"]) == n_sets
    for name, table in one["tables"].items():
        pd.testing.assert_frame_equal(on_ray["tables"][name], table)
    idx = max(one["tables"].values(), key=lambda t: t.path.str.contains("nwpu").sum())
    assert len(idx) == 242 and (~idx.readable).sum() == 1 and (idx.duplicate_of != "").sum() == 1
    parts = sorted((tmp_path / "ray" / "cache" / "index" / "parts").glob("*/*.parquet"))
    assert len(parts) == [2, 2 + 3][n_sets - 1]  # 242 corpus rows and 300 reference rows in partitions of 128
    row = pd.read_parquet(parts[0]).row
    assert row.dtype == np.int64 and row.tolist() == list(range(len(row)))

    assert on_ray["summary"]["counts"]["entropy_cut_bits"] == one["summary"]["counts"]["entropy_cut_bits"] > 0
    # 240 corpus images (and 299 more of the reference), 128 a shard: two files each
    assert sorted(on_ray["store"]) == sorted(one["store"]) and len(one["store"]) == 2 * [2, 5][n_sets - 1]
    for name, data in one["store"].items():
        assert on_ray["store"][name] == data, name  # float16 vectors and their hashes, byte for byte
    assert on_ray["kept"] == one["kept"] and len(on_ray["kept"].splitlines()) == one["summary"]["counts"]["budget"]

    # A run stopped part way: an index shard and partition, the tables and a shard's array are
    # gone. The rerun writes what is missing, to the same bits.
    cache = tmp_path / "ray" / "cache"
    for p in [parts[1], sorted((cache / "index" / "shards").glob("*.parquet"))[0], *(cache / "index").glob("*.parquet")]:
        p.unlink()
    shard = sorted((cache / "embed").glob("*/*.npy"))
    lost = next(p for p in shard if not p.name.endswith(".ids.npy"))
    lost.unlink()
    kept_shard = next(p for p in shard if p != lost and not p.name.endswith(".ids.npy"))
    stamp = kept_shard.stat().st_mtime_ns
    (tmp_path / "ray" / "run" / "kept.txt").unlink()
    run(compose("prune", overrides(corpus, small_reference, tmp_path, "ray", scenes) + ["engine=ray"]), progress=False)
    again = outputs(tmp_path, "ray")
    assert again["kept"] == one["kept"] and again["store"] == one["store"]
    for name, table in one["tables"].items():
        pd.testing.assert_frame_equal(again["tables"][name], table)
    assert kept_shard.stat().st_mtime_ns == stamp  # a finished shard is not computed again


def test_the_cut_from_histograms_is_numpys_percentile(monkeypatch):
    """The order statistics from merged histograms (blocks as Ray tasks get them), with narrow
    bins forced: the same float as np.percentile on ties, a tight cluster and zeros."""
    from prune import engine_ray_index as E

    rng = np.random.default_rng(0)
    cases = [rng.uniform(0, 8, 1001), rng.integers(0, 5, 700) * 0.5, 3 + rng.normal(0, 1e-9, 500),
             np.r_[np.zeros(200), rng.uniform(2.5, 7.9, 333)], np.array([4.2])]
    for x in cases:
        blocks = np.array_split(x, 3)
        run_blocks = lambda fn, col: np.concatenate([np.ravel(fn({"data": b})[col]) for b in blocks])
        for limit in (1, 1 << 16):
            monkeypatch.setattr(E, "LIMIT", limit)
            for p in (1e-9, 10.0, 33.3, 50.0, 99.99, 100.0):
                assert E.percentile_of(len(x), p, run_blocks) == float(np.percentile(x, p)), (len(x), p, limit)
