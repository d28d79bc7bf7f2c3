"""Inputs and outputs a user gets wrong or shares: one bounded reader for large rasters, outputs
that follow the umask, run and cache folders no walk enters, strict list files, and write or
config errors that are one `error:` line before any work."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, ROOT, link_images, shrunk_overrides
from prune.run import run
from rsprune.cache import WriteError, check_writable, write_text
from rsprune.cli import UsageError, compose
from rsprune.corpus import list_files, read_list
from rsprune.imageio import list_images, load_rgb, load_sized, resize
from rsprune.markers import CACHE_MARKER, RUN_MARKER

TILE = DATA / "aid" / "Farmland" / sorted(os.listdir(DATA / "aid" / "Farmland"))[0]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "prune" / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-2000:])
    return lines[0]


# --- one bounded reader ---

def big_tiff(path: Path, side: int = 6000) -> Path:
    """A real AID tile upscaled to side x side, 4 bands (green repeated), 16-bit, zlib: 275 MiB decoded."""
    import tifffile

    rgb = np.asarray(Image.open(TILE).convert("RGB").resize((side, side), Image.NEAREST))
    a = np.empty((side, side, 4), np.uint16)
    a[..., :3] = rgb.astype(np.uint16) * 257
    a[..., 3] = a[..., 1]
    tifffile.imwrite(path, a, compression="zlib", predictor=True, compressionargs={"level": 1})
    return path


def test_embedding_and_training_read_a_large_tiff_in_bounded_memory(tmp_path):
    """Embedding and training latents decode a 6000 x 6000 4-band 16-bit TIFF without ever holding it:
    they used to materialise it whole, then a float64 copy (gigabytes in a prune)."""
    from rsprune.embed_store import _Verified
    from rsprune.fingerprint import digest
    from train.data import ImageFiles

    path = big_tiff(tmp_path / "big.tif")
    h = digest(path.read_bytes())
    for name, item in (("embed", lambda: _Verified([h], [[str(path)]], 128)[0][1].numpy()),
                       ("training", lambda: ImageFiles([str(path)], 64, [h])[0][1])):
        tracemalloc.start()
        try:
            out = item()
            peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert isinstance(out, np.ndarray) and out.shape[2] == 3, (name, out)
        assert peak < 120, f"{name}: {peak:.0f} MiB traced for a 275 MiB raster"
        # The same scene: the source tile at that size, up to the 16-bit stretch.
        src = resize(load_rgb(TILE), out.shape[0]).astype(np.float64)
        assert np.corrcoef(src.ravel(), out.astype(np.float64).ravel())[0, 1] > 0.97, name


def test_ordinary_images_read_exactly_as_before(tmp_path):
    """Under the large-raster size nothing changes: the same pixels as decode-then-resize."""
    import tifffile

    small16 = tmp_path / "small16.tif"
    tifffile.imwrite(small16, (np.asarray(load_rgb(TILE)).astype(np.uint16) * 257))
    for p in [small16, TILE, *sorted((DATA / "nwpu12" / "test" / "beach").iterdir())[:3]]:
        for size in (64, 128, 200):
            assert np.array_equal(load_sized(p, size), resize(load_rgb(p), size)), (p, size)


@pytest.mark.parametrize("layout", ["strips", "tiles", "planar"])
def test_block_means_match_numpy(tmp_path, layout):
    """The strip/tile reader's block means equal numpy's on the whole array (edge blocks included)."""
    import tifffile

    from rsprune import rasters

    rng = np.random.default_rng(0)
    a = rng.integers(0, 60000, (203, 157, 3), dtype=np.uint16)
    kw = {"strips": dict(rowsperstrip=7), "tiles": dict(tile=(32, 48)),
          "planar": dict(planarconfig="separate", rowsperstrip=5)}[layout]
    data = np.moveaxis(a, 2, 0) if layout == "planar" else a
    tifffile.imwrite(tmp_path / "t.tif", data, compression="zlib", **kw)
    step = 10
    with tifffile.TiffFile(tmp_path / "t.tif") as tif:
        got = rasters.box_reduced(tif.pages.first, step)
    want = np.zeros(got.shape, np.float64)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            want[i, j] = a[i * step:(i + 1) * step, j * step:(j + 1) * step].reshape(-1, 3).mean(axis=0)
    assert got.dtype == np.uint16 and np.array_equal(got, np.rint(want).astype(np.uint16))


# --- outputs follow the umask ---

# --- run and cache folders are never corpus images ---

def test_a_corpus_used_as_run_dir_keeps_its_size(tmp_path):
    """Prune with run_dir=CORPUS (its report PNGs land inside), then prune CORPUS elsewhere."""
    corpus = link_images(tmp_path / "corpus", DATA / "nwpu12" / "test", 3)
    over = ("method=random", "ratio=0.85", "report.enabled=true")
    first = run(compose("prune", shrunk_overrides(corpus, corpus, corpus, tmp_path / "cache", *over)), progress=False)
    assert list((corpus / "report").glob("*.png"))
    again = run(compose("prune", shrunk_overrides(corpus, corpus, tmp_path / "elsewhere", tmp_path / "cache2", *over)),
                progress=False)
    assert first["counts"]["files"] == again["counts"]["files"] == 36
    assert first["counts"]["budget"] == again["counts"]["budget"]
    assert (corpus / RUN_MARKER).is_file() and (tmp_path / "cache" / CACHE_MARKER).is_file()


def test_marked_folders_are_not_walked(tmp_path):
    root = tmp_path / "corpus"
    for sub in ("a", "old-run", "old-cache", "old-run/report"):
        (root / sub).mkdir(parents=True)
    for sub in ("a", "old-run", "old-cache", "old-run/report"):
        shutil.copy(TILE, root / sub / "x.jpg")
    (root / "old-run" / RUN_MARKER).write_text("")
    (root / "old-cache" / CACHE_MARKER).write_text("")
    assert list_images(root) == ["a/x.jpg"]
    assert list_images(root / "old-run") == ["x.jpg"]  # named itself: walked, all but its outputs


# --- list files ---

def _lines(tmp_path, text: str, encoding="utf-8") -> Path:
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("header", [False, True])
def test_list_with_a_byte_order_mark(tmp_path, header):
    files = sorted((DATA / "aid" / "Beach").iterdir())[:2]
    if header:  # the mark used to hide the header, and every relative line then failed
        text = f"# base: {DATA}\n" + "".join(os.path.relpath(f, DATA) + "\n" for f in files)
    else:  # it used to become part of the first path
        text = "".join(f"{f}\n" for f in files)
    path = _lines(tmp_path, text, "utf-8-sig")
    assert read_list(path) == [str(f) for f in files]
    assert len(list_files([str(path)])) == 2


def test_list_line_with_trailing_whitespace_is_refused_with_its_number(tmp_path):
    files = sorted((DATA / "aid" / "Beach").iterdir())[:2]
    path = _lines(tmp_path, f"# images\n{files[0]}\n{files[1]}  \n")
    with pytest.raises(UsageError, match=r"line 3: trailing whitespace"):
        read_list(path)
    spaced = tmp_path / "named with space.jpg "  # a file whose name does end in a space is listed
    shutil.copy(files[0], spaced)
    assert read_list(_lines(tmp_path, f"{spaced}\n")) == [str(spaced)]


def test_duplicate_list_line_is_refused_naming_both(tmp_path):
    files = sorted((DATA / "aid" / "Beach").iterdir())[:2]
    path = _lines(tmp_path, f"{files[0]}\n{files[1]}\n{files[0]}\n")
    with pytest.raises(UsageError, match=r"line 3 repeats line 1"):
        list_files([str(path)])


def test_utf16_list_is_one_error_line(tmp_path):
    files = sorted((DATA / "aid" / "Beach").iterdir())[:4]
    path = _lines(tmp_path, "\n".join(map(str, files)) + "\n", "utf-16")
    line = one_error_line(cli(f"data.corpus=[{path}]", f"data.reference={DATA / 'aid'}", f"data.test={path}",
                              f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "method=random"))
    assert "not UTF-8" in line and str(path) in line, line


# --- write and config errors: one line, before any work ---

def test_write_errors_name_the_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / ("n" * 300), tmp_path / "afile" / "out.json", tmp_path / ("d" * 300) / "a.txt"):
        with pytest.raises(WriteError, match="cannot write " + str(target)[:40]):
            write_text(target, "hello")
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    long_ok = tmp_path / ("k" * 250)  # a valid name: its temporary name must not be too long
    write_text(long_ok, "fits")
    assert long_ok.read_text() == "fits"


def test_full_disk_is_one_line_naming_the_file(tmp_path):
    """A file-size limit stands in for a full disk (EFBIG as ENOSPC): one line, no temporary left."""
    out = tmp_path / "big.json"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from rsprune.cache import write_json; "
            f"from rsprune.errors import UsageError\ntry:\n    write_json({str(out)!r}, list(range(100000)))\n"
            "except UsageError as e:\n    print('error:', e, file=sys.stderr); sys.exit(2)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = one_error_line(r)
    assert f"cannot write {out}" in line, line
    assert os.listdir(tmp_path) == []


def test_read_only_folder_is_refused_before_any_work():
    """As an unprivileged user (root writes anywhere): a read-only cold cache folder."""
    folder = Path(tempfile.mkdtemp(prefix="rsprune-ro-"))
    try:
        os.chmod(folder, 0o555)
        if os.geteuid() == 0:
            pid = os.fork()
            if pid == 0:  # the child drops privileges for good; its exit code is the verdict
                os.setgid(65534)
                os.setuid(65534)
                try:
                    check_writable(folder / "cache", "cache_dir")
                    os._exit(1)
                except UsageError as e:
                    os._exit(0 if "cache_dir=" in str(e) and "not writable" in str(e) else 3)
            assert os.waitpid(pid, 0)[1] >> 8 == 0
        else:
            with pytest.raises(UsageError, match="not writable"):
                check_writable(folder / "cache", "cache_dir")
        assert os.listdir(folder) == []
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder, ignore_errors=True)


def test_config_error_exits_before_the_split_is_drawn(tmp_path):
    """With the default data (the split drawn from data.root), a bad value writes no split."""
    root = tmp_path / "data"
    link_images(root / "aid", DATA / "aid", 3)
    split = tmp_path / "split"
    base = [f"data.root={root}", "data.split.pool=[aid]", f"data.split.dir={split}", f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}"]
    assert "encoder.resolution must be >= 32" in one_error_line(cli(*base, "encoder.resolution=1"))
    assert not split.exists() and not (tmp_path / "cache").exists()
    from prune.validate import precheck

    (tmp_path / "afile").write_text("x")
    for bad, why in (("ratio=abc", "ratio must be"), ("encoder.resolution=1", "encoder.resolution must be >= 32"),
                     (f"run_dir={tmp_path / ('r' * 300)}", "more than the 255"),
                     (f"cache_dir={tmp_path / 'afile' / 'cache'}", "is a file, not a folder")):
        with pytest.raises(UsageError, match=why):
            compose("prune", base + [bad], precheck=precheck)
        assert not split.exists() and not (tmp_path / "cache").exists(), bad
