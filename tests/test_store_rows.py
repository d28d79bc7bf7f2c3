"""Rows of the embedding store by position (what an engine=ray task is sent) give the bits of a
gather by content hash, also from a shard that holds fewer rows than planned (refused files)."""
from __future__ import annotations

import numpy as np
import pytest

from rsprune import store_rows
from rsprune.cache import save_npy
from rsprune.embed_store import gather, shard_plan


def test_positions_read_the_rows_a_hash_gather_reads(tmp_path):
    rng = np.random.default_rng(0)
    hashes = [f"{i:040x}" for i in range(0, 50, 2)]  # 25 sorted hashes, odd ones absent
    plan = shard_plan(hashes, 8, "k")
    refused = {hashes[9]}  # the second shard lost one file at embedding time
    for key, planned in plan:
        held = [h for h in planned if h not in refused]
        save_npy(tmp_path / f"{key}.ids.npy", np.asarray(held), checksum=True)
        x = rng.standard_normal((len(held), 16)).astype(np.float16)
        save_npy(tmp_path / f"{key}.npy", x, checksum=True)
    t = store_rows.table(plan, tmp_path)
    assert t.starts.tolist() == [0, 8, 15, 23, 24] and t.dim == 16
    want = [hashes[i] for i in (24, 3, 10, 0, 8, 17, 10)]  # any order, repeats, across the short shard
    pos = store_rows.positions(plan, tmp_path, t, want)
    assert np.array_equal(store_rows.gather_at(t, pos).view(np.uint32), gather(plan, tmp_path, want).view(np.uint32))
    store_rows.save(t, tmp_path / "t.npz")
    assert np.array_equal(store_rows.gather_at(store_rows.load(str(tmp_path / "t.npz")), pos[2:4]),
                          gather(plan, tmp_path, want[2:4]))
    with pytest.raises(RuntimeError, match="no embedding"):
        store_rows.positions(plan, tmp_path, t, [hashes[9]])  # the refused one
    with pytest.raises(RuntimeError, match="no embedding"):
        store_rows.positions(plan, tmp_path, t, [f"{7:040x}"])  # never in the store
