"""Bad input: damaged files are recorded and never selected; bad usage exits 2 writing nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import DATA, ROOT, link_images, shrunk_overrides
from prune.index import scan_file
from prune.run import run
from rsprune import knn
from rsprune.manifest import read_kept, read_manifest


@pytest.fixture
def damaged_corpus(tmp_path) -> Path:
    """60 real images plus damaged files and exact byte duplicates."""
    root = link_images(tmp_path / "damaged", DATA / "nwpu12" / "test", 5)
    real = DATA / "aid" / "Beach" / "beach_1.jpg"
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    data = real.read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "text.jpg").write_text("this is not an image\n")
    shutil.copy(real, bad / "copy_a.jpg")  # two byte-identical copies: one is kept
    shutil.copy(real, bad / "copy_b.jpg")
    return root


def test_damaged_files_are_recorded_and_never_selected(damaged_corpus, small_reference, tmp_path):
    from rsprune.cli import compose

    cfg = compose("prune", shrunk_overrides(damaged_corpus, small_reference, tmp_path / "r", tmp_path / "c",
                                            "ratio=0.5"))
    s = run(cfg, progress=False)
    m = read_manifest(tmp_path / "r").set_index(read_manifest(tmp_path / "r").path.map(lambda p: Path(p).name))
    assert len(m) == 65 and s["counts"]["files"] == 65
    for name, err in (("zero.jpg", "empty file"), ("truncated.jpg", "OSError"), ("text.jpg", "UnidentifiedImageError")):
        assert not m.loc[name, "readable"] and err in m.loc[name, "error"], (name, m.loc[name, "error"])
        assert m.loc[name, "reason"] == "unreadable" and not m.loc[name, "selected"]
    dup = m.loc[["copy_a.jpg", "copy_b.jpg"]]
    assert dup.readable.all() and (dup.reason == "pruned_exact_duplicate").sum() == 1
    assert s["counts"]["exact_duplicates"] == 1 and s["counts"]["unreadable"] == 3
    assert len(read_kept(tmp_path / "r")) == round(0.5 * 65)


def test_unreadable_permission_is_recorded(tmp_path):
    src = DATA / "aid" / "Beach" / "beach_1.jpg"
    folder = Path(tempfile.mkdtemp(prefix="rsprune-perm-"))
    try:
        os.chmod(folder, 0o755)
        locked = folder / "locked.jpg"
        shutil.copy(src, locked)
        os.chmod(locked, 0)
        # Root reads anything: the scan drops to an unprivileged effective user first.
        drop = "import os; os.setegid(65534); os.seteuid(65534); " if os.geteuid() == 0 else ""
        code = ("import json; from prune.index import scan_file; " + drop +
                f"r = scan_file({str(locked)!r}, 4, 512); print(json.dumps([r['readable'], r['error']]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == '[false, "PermissionError: Permission denied"]'
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert scan_file(str(src), 4, 512)["readable"]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "prune" / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("case", ["ratio_high", "ratio_zero", "ratio_text", "missing_corpus", "empty_corpus",
                                  "unknown_method", "unknown_encoder", "one_class_reference", "no_corpus",
                                  "faiss_gpu_missing", "faiss_threads_zero", "embed_dtype_int8", "budget_zero"])
def test_usage_errors_exit_2_with_one_line_and_write_nothing(case, small_corpus, small_reference, tmp_path):
    if case == "faiss_gpu_missing" and knn.gpu_available():
        pytest.skip("faiss-gpu sees a GPU here: faiss.gpu=true is valid")
    empty = tmp_path / "empty"
    empty.mkdir()
    one = link_images(tmp_path / "one", DATA / "aid", 3)
    for extra in [p for p in one.iterdir() if p.name != "Beach"]:
        shutil.rmtree(extra)
    base = dict(corpus=f"[{small_corpus}]", ref=str(small_reference))
    over = {"ratio_high": ["ratio=1.0"], "ratio_zero": ["ratio=0"], "ratio_text": ["ratio=abc"],
            "missing_corpus": [], "empty_corpus": [], "unknown_method": ["method=magic"],
            "unknown_encoder": ["encoder=resnet9000"], "one_class_reference": [], "no_corpus": [],
            "faiss_gpu_missing": ["faiss.gpu=true"], "faiss_threads_zero": ["faiss.threads=0"],
            "embed_dtype_int8": ["embed.dtype=int8"], "budget_zero": ["ratio=0.999"]}[case]
    if case == "missing_corpus":
        base["corpus"] = f"[{tmp_path / 'nope'}]"
    if case == "empty_corpus":
        base["corpus"] = f"[{empty}]"
    if case == "no_corpus":
        base["corpus"] = "[]"
    if case == "one_class_reference":
        base["ref"] = str(one)
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    r = cli(f"data.corpus={base['corpus']}", f"data.reference={base['ref']}", f"run_dir={out_dir}",
            f"cache_dir={cache}", *over)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not out_dir.exists() and not cache.exists()


def test_help_lists_groups():
    r = cli("--help")
    assert r.returncode == 0 and "method" in r.stdout and "+experiment" in r.stdout
