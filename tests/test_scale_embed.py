"""Sharded index and embedding at scale: two accelerate CPU processes write the same index table
and embedding store as one process.

Runs the real command `accelerate launch --multi_gpu --num_processes 2 prune/embed.py ...` with
ACCELERATE_USE_CPU=1 on 192 real NWPU images (16 per class), 3 index and 3 embedding shards of
64, and compares with what one process writes through `prune.embed.run` (computed once for the
module).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prune import embed
from rsprune.cli import compose

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSPRUNE_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """16 real NWPU test images of each of the 12 classes, as symbolic links."""
    dst = tmp_path_factory.mktemp("scale") / "nwpu"
    for cls in sorted(p for p in (DATA / "nwpu12" / "test").iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:16]:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


def overrides(corpus: Path, cache: Path) -> list[str]:
    # method=random: no reference needed, so only the corpus is embedded; float32 storage so
    # the comparison sees the encoder's own numbers, not float16 rounding.
    return ["method=random", f"data.corpus=[{corpus}]", f"cache_dir={cache}", "embed.shard_size=64",
            "index.shard_size=64", "embed.dtype=float32", "index.num_workers=0", "encoder.num_workers=0",
            "report.enabled=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> dict:
    """The store one process writes: run's summary plus the cache folder."""
    cache = tmp_path_factory.mktemp("one")
    return {**embed.run(compose("prune", overrides(corpus, cache)), progress=False), "cache": cache}


def shards(store: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {p.name[:-4]: (np.load(store / (p.name[:-4] + ".ids.npy")), np.load(p))
            for p in sorted(store.glob("*.npy")) if not p.name.endswith(".ids.npy")}


def launch_two(script: str, args: list[str]) -> subprocess.CompletedProcess:
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.15 (its simple launcher; several
    # CPU processes need MPI or a config file); torchrun through --multi_gpu starts two, and
    # ACCELERATE_USE_CPU=1 makes them gloo CPU processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "prune" / script)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_accelerate_processes_write_the_single_process_store(corpus, single, tmp_path):
    one = single
    res = launch_two("embed.py", overrides(corpus, tmp_path / "two"))
    for stage in ("index", "embed"):
        assert f"{stage}[0]" in res.stderr and f"{stage}[1]" in res.stderr, f"both processes should run {stage} shards"

    tables = [sorted((cache / "index").glob("*.parquet")) for cache in (one["cache"], tmp_path / "two")]
    assert [p.name for p in tables[0]] == [p.name for p in tables[1]] and len(tables[0]) == 1
    idx1, idx2 = (pd.read_parquet(t[0]) for t in tables)
    assert len(idx1) == 192 and idx1.readable.all()
    pd.testing.assert_frame_equal(idx1, idx2)  # same rows, same order, same entropies
    assert len(list((tmp_path / "two" / "index" / "shards").glob("*.parquet"))) == 3

    a, b = shards(Path(one["store"])), shards(tmp_path / "two" / "embed" / one["encoder_key"])
    assert one["images"] == 192 and one["shards"] == 3
    assert sorted(a) == sorted(b), "the two runs planned different shards"
    for k in a:
        assert a[k][0].tolist() == b[k][0].tolist(), f"shard {k}: ids differ"
        cos = (a[k][1] * b[k][1]).sum(axis=1)
        assert cos.min() > 0.99999 and np.abs(a[k][1] - b[k][1]).max() < 1e-4, f"shard {k}: embeddings differ"


def test_rerun_recomputes_only_a_missing_shard(corpus, single, tmp_path):
    shutil.copytree(single["cache"], tmp_path / "cache")
    cfg = compose("prune", overrides(corpus, tmp_path / "cache"))
    store = tmp_path / "cache" / "embed" / single["encoder_key"]
    stamp = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    lost = sorted(n for n in stamp if n.endswith(".npy") and not n.endswith(".ids.npy"))[0]
    (store / lost).unlink()  # the array is the shard's done-marker (written last)
    embed.run(cfg, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert after.keys() == stamp.keys()
    changed = sorted(n for n in after if after[n] != stamp[n])
    # The shard's two files and their checksums (prune/embed.py verifies a shard by them).
    assert changed == sorted(n + ext for n in (lost, lost[:-4] + ".ids.npy") for ext in ("", ".sha256"))
    assert np.array_equal(np.load(store / lost), np.load(Path(single["store"]) / lost))


def test_prune_run_on_two_processes_keeps_what_one_process_keeps(corpus, tmp_path):
    """The whole pipeline (scenes against a reference, here the corpus's own folders) launched on
    two processes: index and embedding split, the rest on the main process."""
    from prune.run import run

    def args(name):
        over = [o for o in overrides(corpus, tmp_path / name / "cache") if not o.startswith("method=")]
        return over + [f"data.reference={corpus}", f"run_dir={tmp_path / name / 'run'}"]

    launch_two("run.py", ["+experiment=ratio85"] + args("two"))
    run(compose("prune", ["+experiment=ratio85"] + args("one")), progress=False)
    kept = [(tmp_path / n / "run" / "kept.txt").read_text().split() for n in ("one", "two")]
    assert len(kept[0]) == 29 and kept[0] == kept[1]


def test_gather_reads_only_the_shards_holding_the_rows(single, tmp_path):
    """What a task gathers costs what its rows cost: with one shard left, its rows still gather
    to the same bits as from the whole store, and `Store.only` sends a task that shard alone."""
    from rsprune.embed_store import Store, gather

    full = Path(single["store"])
    plan = sorted(((p.name[:-8], np.load(p).tolist()) for p in full.glob("*.ids.npy")), key=lambda s: s[1][0])
    assert len(plan) == 3
    k, h = plan[1]
    part = tmp_path / "one-shard"
    part.mkdir()
    for name in (f"{k}.npy", f"{k}.ids.npy"):
        shutil.copy(full / name, part / name)
    want = [h[5], h[0], h[-1], h[5]]
    store = Store(plan, part, single["encoder_key"], sum(len(s) for _, s in plan), {})
    assert np.array_equal(store.gather(want), gather(plan, full, want))
    assert [s for s, _ in store.only(want).plan] == [k]
    assert gather(plan, full, []).shape == (0, len(gather(plan, full, h[:1])[0]))
    with pytest.raises(FileNotFoundError):  # a row of a shard that is not there is not found quietly
        store.gather([plan[0][1][0]])
