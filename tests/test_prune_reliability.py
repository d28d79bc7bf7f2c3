"""Issue 13 (pruning): a cache verified before it is trusted, bounded memory on large rasters,
and every bad input refused or recorded with a stable reason."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import DATA, ROOT, link_images, shrunk_overrides
from prune import embed
from prune.index import build_index, scan_file
from prune.run import run
from rsprune.cli import UsageError, compose
from rsprune.manifest import read_kept, read_manifest

REAL = DATA / "aid" / "Beach" / "beach_1.jpg"


def cfg_for(corpus, tmp_path, *extra, cache=None):
    return compose("prune", shrunk_overrides(corpus, corpus, tmp_path / "run", cache or tmp_path / "cache", *extra))


@pytest.fixture
def tiny(tmp_path) -> Path:
    """36 real NWPU images (3 per class), as links."""
    return link_images(tmp_path / "tiny", DATA / "nwpu12" / "test", 3)


# --- cache and stored state ---

def test_embed_dtype_is_part_of_the_store_key(tiny, tmp_path):
    """A float32 store and a float16 store never share shards (the second used to read the first)."""
    base = ["method=random", f"data.corpus=[{tiny}]", f"cache_dir={tmp_path / 'c'}", "index.num_workers=0",
            "encoder.num_workers=0", "embed.shard_size=64"]
    a = embed.run(compose("prune", base + ["embed.dtype=float32"]), progress=False)
    b = embed.run(compose("prune", base + ["embed.dtype=float16"]), progress=False)
    assert a["store"] != b["store"]
    for out, dtype in ((a, np.float32), (b, np.float16)):
        arrays = [p for p in Path(out["store"]).glob("*.npy") if not p.name.endswith(".ids.npy")]
        assert arrays and all(np.load(p).dtype == dtype for p in arrays), out


def test_damaged_cache_entries_are_recomputed_with_a_warning(tiny, tmp_path, capfd):
    """A same-size damaged embedding shard and a truncated index table: each named in one warning,
    recomputed, and the selection is the undamaged one."""
    cache = tmp_path / "cache"
    over = ("method=kmeans_uniform", "ratio=0.5", "embed.shard_size=16")
    run(cfg_for(tiny, tmp_path, *over, cache=cache), progress=False)
    clean = read_kept(tmp_path / "run")
    shard = sorted(p for p in cache.glob("embed/*/*.npy") if not p.name.endswith(".ids.npy"))[1]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # the last embedding row's values zeroed, size unchanged
    shard.write_bytes(bytes(data))
    table = next(cache.glob("index/*.parquet"))
    table.write_bytes(table.read_bytes()[:100])
    capfd.readouterr()
    run(cfg_for(tiny, tmp_path, *over, "run_dir=" + str(tmp_path / "again"), cache=cache), progress=False)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any(str(shard) in w and "damaged" in w for w in warnings), err
    assert any(str(table) in w for w in warnings), err
    assert read_kept(tmp_path / "again") == clean
    assert np.load(shard).shape[0] > 0 and Path(str(shard) + ".sha256").exists()


def test_unverifiable_entry_is_recomputed(tiny, tmp_path, capfd):
    """An entry without its checksum (an older cache, a kill between the two writes)."""
    cache = tmp_path / "cache"
    run(cfg_for(tiny, tmp_path, "method=random", cache=cache), progress=False)
    table = next(cache.glob("index/*.parquet"))
    Path(str(table) + ".sha256").unlink()
    capfd.readouterr()
    run(cfg_for(tiny, tmp_path, "method=random", cache=cache), progress=False)
    assert f"warning: cache entry {table} has no checksum (unverifiable)" in capfd.readouterr().err
    assert Path(str(table) + ".sha256").exists()


def _nobody():
    """Run a block as an unprivileged user (root reads anything) without leaving it."""
    class Drop:
        def __enter__(self):
            if os.geteuid() == 0:
                os.setegid(65534)
                os.seteuid(65534)

        def __exit__(self, *exc):
            if os.getuid() == 0:
                os.seteuid(0)
                os.setegid(0)
    return Drop()


def test_fixed_permissions_are_seen_on_the_next_run():
    """chmod keeps size and mtime (the index key): a cached 'unreadable' is checked again."""
    folder = Path(tempfile.mkdtemp(prefix="rsprune-perm-"))
    try:
        os.chmod(folder, 0o777)
        corpus, cache = folder / "corpus", folder / "cache"
        for d in (corpus, cache):
            d.mkdir()
            os.chmod(d, 0o777)  # mkdir's mode goes through the umask
        shutil.copy(REAL, corpus / "a.jpg")
        shutil.copy(DATA / "aid" / "Beach" / "beach_2.jpg", corpus / "b.jpg")
        os.chmod(corpus / "a.jpg", 0)
        icfg = OmegaConf.create({"shard_size": 8, "num_workers": 0})
        ecfg = OmegaConf.create({"grid": 4, "max_side": 64, "area_grid": 8, "flat_bits": 1.0, "bright": 205})
        # Once as root on the readable file alone: every lazy import happens here (an unprivileged
        # user cannot read root's site-packages).
        warm = folder / "warm"
        warm.mkdir()
        shutil.copy(REAL, warm / "w.jpg")
        build_index([str(warm)], icfg, ecfg, str(folder / "warm-cache"), progress=False)
        with _nobody():
            first, _ = build_index([str(corpus)], icfg, ecfg, str(cache), progress=False)
        assert first.readable.tolist() == [False, True] and "PermissionError" in first.error[0]
        os.chmod(corpus / "a.jpg", 0o644)
        second, _ = build_index([str(corpus)], icfg, ecfg, str(cache), progress=False)
        assert second.readable.tolist() == [True, True] and second.error.tolist() == ["", ""]
        assert second.entropy_local.notna().all()
        third, _ = build_index([str(corpus)], icfg, ecfg, str(cache), progress=False)  # the fix was saved
        assert third.readable.all()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- input ---

def _peak_rss_mib_of_scan(path: Path) -> list:
    """[peak RSS growth in MiB, readable, error, width] of scan_file on one file, in a fresh
    process: VmHWM is reset after the imports (ru_maxrss would carry this process's high-water
    mark across fork + exec)."""
    code = ("import json; from prune.index import scan_file\n"
            "def status(k):\n"
            "    return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith(k))\n"
            "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS')\n"
            f"row = scan_file({str(path)!r}, 4, 512)\n"
            "print(json.dumps([status('VmHWM') - before, bool(row['readable']), row['error'], row['width']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_16bit_tiff_is_scored_in_bounded_memory(tmp_path):
    """6000 x 6000, 4 bands, uint16, zlib (about 1 MB on disk, 275 MiB decoded): the index pass
    used to take over 4 GB for it."""
    import tifffile

    a = np.zeros((6000, 6000, 4), np.uint16)
    a[::7] = 1000
    a[:, ::13, 1] = 30000
    tifffile.imwrite(tmp_path / "big.tif", a, compression="zlib")
    del a
    grew, readable, error, width = _peak_rss_mib_of_scan(tmp_path / "big.tif")
    assert readable and error == "" and width == 6000
    assert grew < 150, f"peak RSS grew {grew:.0f} MiB for one large TIFF"


def test_tiff_in_one_huge_strip_is_recorded_not_fatal(tmp_path):
    """A raster that cannot be read piecewise is that file's reason, not the run's end."""
    import tifffile

    tifffile.imwrite(tmp_path / "strip.tif", np.zeros((9000, 9000), np.uint16), compression="zlib",
                     rowsperstrip=9000)
    row = scan_file(str(tmp_path / "strip.tif"), 4, 512)
    assert not row["readable"] and "bounded memory" in row["error"], row["error"]


def test_reasons_hold_no_memory_address(tmp_path):
    bad = tmp_path / "text.jpg"
    bad.write_text("this is not an image\n")
    row = scan_file(str(bad), 4, 512)
    assert row["error"] == "UnidentifiedImageError: cannot identify image file <_io.BytesIO>", row["error"]


def test_directory_symlinks_are_followed_without_looping(tmp_path):
    corpus = link_images(tmp_path / "corpus", DATA / "nwpu12" / "test", 2)
    elsewhere = link_images(tmp_path / "elsewhere", DATA / "aid", 1)
    (corpus / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)  # back to the top: a loop
    from prune.index import walk

    files = walk([str(corpus)])
    assert len(files) == 24 + 30  # each real folder once, the loop not followed
    assert files.relpath.str.startswith("linked/").sum() == 30


def test_run_and_cache_folders_inside_the_corpus_are_not_indexed(tiny, tmp_path):
    run_dir, cache = tiny / "out", tiny / "cache"
    for folder in (run_dir / "report", cache):
        folder.mkdir(parents=True)
        shutil.copy(REAL, folder / "planted.jpg")
    s = run(compose("prune", shrunk_overrides(tiny, tiny, run_dir, cache, "method=random")), progress=False)
    assert s["counts"]["files"] == 36


def test_line_break_in_a_file_name_is_recorded_unusable(tiny, tmp_path):
    odd = sorted(tiny.iterdir())[0] / "two\nlines.jpg"
    shutil.copy(REAL, odd)
    run(cfg_for(tiny, tmp_path, "method=random", "ratio=0.05"), progress=False)
    m = read_manifest(tmp_path / "run").set_index("path")
    assert not m.loc[str(odd), "readable"] and "line break" in m.loc[str(odd), "error"]
    kept = read_kept(tmp_path / "run")
    assert len(kept) == round(0.95 * 37) and all(Path(p).is_file() for p in kept)


def test_reference_class_with_no_readable_file_is_dropped_and_names_match(tmp_path, capfd):
    """The corpus is 2 images of each of 3 reference classes; the reference gets a class that
    sorts first and holds only unreadable files. knn=1 puts a reference image in its own class,
    so every scene name must equal the image's folder."""
    ref = link_images(tmp_path / "ref", DATA / "aid", 4)
    for cls in sorted(p.name for p in ref.iterdir())[3:]:
        shutil.rmtree(ref / cls)
    (ref / "AAA_broken").mkdir()
    for i in range(3):
        (ref / "AAA_broken" / f"{i}.jpg").write_text("not an image")
    corpus = tmp_path / "corpus"
    for cls in sorted(p.name for p in ref.iterdir() if p.name != "AAA_broken"):
        (corpus / cls).mkdir(parents=True)
        for f in sorted((ref / cls).iterdir())[:2]:
            (corpus / cls / f.name).symlink_to(f.resolve())
    cfg = compose("prune", shrunk_overrides(corpus, ref, tmp_path / "run", tmp_path / "cache", "ratio=0.5",
                                            "method=scene_proportional", "scenes.assign=knn", "scenes.knn=1",
                                            "scenes.threshold=0"))
    capfd.readouterr()
    run(cfg, progress=False)
    assert "AAA_broken" in capfd.readouterr().err
    m = read_manifest(tmp_path / "run")
    folder = m.path.map(lambda p: Path(p).parent.name)
    assert (m.scene_name == folder).all(), m[["path", "scene_name"]]


def test_budget_that_rounds_to_zero_is_refused(tiny, tmp_path):
    with pytest.raises(UsageError, match="= 0 images"):
        run(cfg_for(tiny, tmp_path, "method=random", "ratio=0.99"), progress=False)
    assert not (tmp_path / "run").exists()


def test_all_unreadable_says_what_is_wrong(tmp_path):
    corpus = tmp_path / "bad"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.jpg").write_text("not an image")
    with pytest.raises(UsageError) as e:
        run(cfg_for(corpus, tmp_path, "method=random", "ratio=0.5"), progress=False)
    msg = str(e.value)
    assert "none of the 4" in msg and "4 x UnidentifiedImageError" in msg and "lower the ratio" not in msg, msg


def test_usage_error_under_accelerate_launch_stays_visible(tmp_path):
    """torchrun ends with its own traceback and exit code 1 (documented); the child's one line
    must be the root cause it reports, in the last lines, not only far above them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "prune" / "embed.py"), "ratio=abc", f"cache_dir={tmp_path / 'c'}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    tail = r.stderr.strip().splitlines()[-4:]
    assert any("error: ratio must be a number strictly between 0 and 1" in line for line in tail), tail
    assert not (tmp_path / "c").exists()
