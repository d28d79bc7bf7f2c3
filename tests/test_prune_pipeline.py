"""The whole pruning command on small real corpora: outputs, exact budget, determinism, cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, shrunk_overrides
from prune.methods import METHODS
from prune.run import run
from rsprune.manifest import MANIFEST_COLUMNS, read_kept, read_manifest


def test_outputs_and_manifest_schema(prune_cfg, tmp_path):
    cfg = prune_cfg("report.enabled=true", run_dir=tmp_path / "r")
    summary = run(cfg, progress=False)
    out = tmp_path / "r"
    m = read_manifest(out)
    assert list(m.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    n = len(m)
    assert n == 240 and m.id.is_unique
    assert m.selected.sum() == round(0.15 * n) == summary["counts"]["selected"]
    assert read_kept(out) == sorted(m.path[m.selected])
    # Selected rows come only from the stage-1 pool and carry a scene and a cluster.
    sel = m[m.selected]
    assert sel.stage1_kept.all() and (sel.cluster >= 0).all() and (sel.scene >= -1).all()
    assert set(m.reason) <= {"selected", "pruned_budget", "pruned_low_entropy", "pruned_near_duplicate",
                             "pruned_exact_duplicate", "unreadable"}
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["files"] == n and s["config"]["ratio"] == 0.85 and "torch" in s["versions"]
    assert set(s["timings_s"]) >= {"index", "entropy", "embed", "scenes", "clusters", "select"}
    assert sum(v["selected"] for v in s["per_scene"].values()) == m.selected.sum()
    for fig in ("entropy_histogram", "scene_histogram", "cluster_sizes", "montage_kept_vs_pruned"):
        assert (out / "report" / f"{fig}.png").stat().st_size > 1000


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9, 0.95])
def test_budget_is_exact_for_every_method(prune_cfg, tmp_path, method, ratio):
    s = run(prune_cfg(f"method={method}", f"ratio={ratio}", run_dir=tmp_path / "r"), progress=False)
    assert s["counts"]["selected"] == round((1 - ratio) * 240)
    assert len(read_kept(tmp_path / "r")) == round((1 - ratio) * 240)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bytes_other_seed_differs(prune_cfg, tmp_path, method):
    kept = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(prune_cfg(f"method={method}", f"seed={seed}", run_dir=tmp_path / name), progress=False)
        kept[name] = (tmp_path / name / "kept.txt").read_bytes()
    assert kept["a"] == kept["b"]
    if method == "entropy":  # a pure ranking: no seed enters it
        assert kept["a"] == kept["c"]
    else:
        assert kept["a"] != kept["c"]


def test_rerun_reuses_stages_and_a_change_recomputes_only_what_it_affects(prune_cfg, tmp_path):
    cache = tmp_path / "cache"
    first = run(prune_cfg(run_dir=tmp_path / "a", cache_dir=cache), progress=False)
    assert first["cached"] == {"scenes": False, "clusters": False}
    shards = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("embed/*/*")}
    assert len(shards) > 4
    again = run(prune_cfg(run_dir=tmp_path / "b", cache_dir=cache), progress=False)
    assert again["cached"] == {"scenes": True, "clusters": True}
    # No embedding shard was computed again: none written, none replaced (an atomic rewrite would
    # give a new inode). How much faster the warm run is: benchmarks/pipeline.py, BENCHMARKS.md.
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("embed/*/*")} == shards
    # Selection knobs leave scenes and clusters alone; a clustering knob recomputes clusters only.
    sel = run(prune_cfg("selection.alpha=1.0", run_dir=tmp_path / "c", cache_dir=cache), progress=False)
    assert sel["cached"] == {"scenes": True, "clusters": True}
    clu = run(prune_cfg("clustering.cluster_size=7", run_dir=tmp_path / "d", cache_dir=cache), progress=False)
    assert clu["cached"] == {"scenes": True, "clusters": False}
    index_files = list((cache / "index").glob("*.parquet"))
    assert len(index_files) == 2  # corpus and reference, never rebuilt
    assert (tmp_path / "a" / "kept.txt").read_bytes() == (tmp_path / "b" / "kept.txt").read_bytes()


def test_kill_during_embedding_resumes_to_the_same_kept(small_corpus, small_reference, tmp_path):
    """SIGKILL the command once some embedding shards exist; rerun; compare with a clean run."""
    cache = tmp_path / "cache"
    args = shrunk_overrides(small_corpus, small_reference, tmp_path / "killed", cache, "embed.shard_size=32")
    cmd = [sys.executable, str(ROOT / "prune" / "run.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        shards = [p for p in cache.glob("embed/*/*.npy") if not p.name.endswith(".ids.npy")]
        if len(shards) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p for p in cache.glob("embed/*/*.npy") if not p.name.endswith(".ids.npy")]
    assert 3 <= len(done) < 17  # 540 images in shards of 32: killed part-way
    assert not (tmp_path / "killed" / "kept.txt").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    clean = shrunk_overrides(small_corpus, small_reference, tmp_path / "clean", tmp_path / "cache2",
                             "embed.shard_size=32")
    subprocess.run([sys.executable, str(ROOT / "prune" / "run.py"), *clean], check=True, capture_output=True)
    assert (tmp_path / "killed" / "kept.txt").read_bytes() == (tmp_path / "clean" / "kept.txt").read_bytes()
    a = pd.read_parquet(tmp_path / "killed" / "manifest.parquet")
    b = pd.read_parquet(tmp_path / "clean" / "manifest.parquet")
    assert np.allclose(a.centroid_distance.fillna(-1), b.centroid_distance.fillna(-1), atol=1e-6)
