"""Training data compared by content: latent caches follow the files' bytes, and a copy or a
hardlink of a test image is refused like the image itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from conftest import ROOT as REPO, TAEF2_DIR, aid_paths, tiny_overrides, write_kept

from rsprune.cli import UsageError, compose

pytestmark = pytest.mark.usefixtures("one_thread")


def _copies(folder, sources):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sources):
        dst = folder / f"img_{i}.jpg"
        shutil.copyfile(src, dst)
        out.append(str(dst))
    return out


def _overwrite(paths, sources, keep_mtime: bool):
    """Write other real images into the same files (same inodes), optionally with the old mtime."""
    for p, src in zip(paths, sources):
        st = os.stat(p)
        with open(p, "r+b") as f:
            f.truncate(0)
            f.write(open(src, "rb").read())
        if keep_mtime:  # as `cp -p` or an archive tool would: only the ctime tells
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_latents_are_encoded_again_when_listed_files_change_in_place(tmp_path, keep_mtime):
    from rsprune.autoencoders import build_first_stage
    from train.data import cached_latents

    fs = build_first_stage(OmegaConf.create({"kind": "taef2", "path": str(TAEF2_DIR)}))
    paths = _copies(tmp_path / "imgs", aid_paths(6))
    first, _ = cached_latents(fs, paths, 32, tmp_path / "cache", 3, 0, show_progress=False)
    first = np.array(first)
    _overwrite(paths, aid_paths(6, offset=3), keep_mtime)
    again, meta = cached_latents(fs, paths, 32, tmp_path / "cache", 3, 0, show_progress=False)
    clean, _ = cached_latents(fs, paths, 32, tmp_path / "clean", 3, 0, show_progress=False)
    assert meta["n"] == 6
    assert not np.array_equal(np.array(again), first)  # the old cache is not reused ...
    np.testing.assert_array_equal(np.array(again), np.array(clean))  # ... the new bytes are encoded
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 2


def test_training_on_overwritten_files_trains_on_the_new_images(tmp_path):
    """The issue's case: the same list, files overwritten, a second run folder: other weights."""
    from safetensors.torch import load_file

    from train.main import run

    paths = _copies(tmp_path / "imgs", aid_paths(12))
    kept = write_kept(tmp_path / "prune", paths)
    extra = {"train.max_steps": 2, "train.checkpoint_every": 2, "train.sample_every": 0,
             "optim.decay_steps": 2, "data.scale_images": 8, "eval.heldout_n": 4}

    def weights(run_dir):
        run(compose("train", tiny_overrides(kept, run_dir, tmp_path / "cache", **extra)))
        return load_file(next((run_dir / "checkpoints").glob("step_*/unet/*.safetensors")))

    a = weights(tmp_path / "a")
    _overwrite(paths, aid_paths(12, offset=40), keep_mtime=False)
    b = weights(tmp_path / "b")
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_downstream_latents_follow_the_pixels_not_the_label(tmp_path):
    from downstream.finetune import encode_cached
    from rsprune.autoencoders import build_first_stage
    from train.data import load_images

    fs = build_first_stage(OmegaConf.create({"kind": "taef2", "path": str(TAEF2_DIR)}))
    a, b = load_images(aid_paths(4), 32), load_images(aid_paths(4, offset=5), 32)
    za = encode_cached(fs, a, ["sr-hr", ["same/paths"], 32], tmp_path)
    zb = encode_cached(fs, b, ["sr-hr", ["same/paths"], 32], tmp_path)  # same ident, other images
    assert not np.array_equal(za, zb)
    np.testing.assert_array_equal(zb, encode_cached(fs, b, ["sr-hr"], tmp_path / "clean"))


@pytest.fixture
def test_copy(tmp_path):
    """A test split of real images held in tmp (so it can be hardlinked), and 12 training images."""
    test = _copies(tmp_path / "test", aid_paths(8, offset=7))
    listed = tmp_path / "test.txt"
    listed.write_text("".join(p + "\n" for p in test))
    return listed, test, aid_paths(12)


@pytest.mark.parametrize("how", ["copy", "hardlink"])
def test_a_copy_or_hardlink_of_a_test_image_is_refused(tmp_path, test_copy, how):
    from train.main import run

    listed, test, train = test_copy
    twin = tmp_path / "mine" / "twin.jpg"
    twin.parent.mkdir()
    (shutil.copyfile if how == "copy" else os.link)(test[3], twin)
    kept = write_kept(tmp_path / "prune", train + [str(twin)])
    over = tiny_overrides(kept, tmp_path / "run", tmp_path / "cache", **{"data.test": str(listed)})
    with pytest.raises(UsageError, match=rf"1 training images are in the test split .*twin\.jpg \(same bytes as .*img_3\.jpg\)"):
        run(compose("train", over))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_refusal_is_one_error_line_with_exit_code_2(tmp_path, test_copy):
    listed, test, train = test_copy
    twin = tmp_path / "twin.jpg"
    os.link(test[0], twin)
    kept = write_kept(tmp_path / "prune", train + [str(twin)])
    over = tiny_overrides(kept, tmp_path / "run", tmp_path / "cache", **{"data.test": str(listed)})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "train/main.py", *over], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "same bytes as" in errors[0] and "Traceback" not in proc.stderr


def test_fingerprint_memo_is_verified_and_follows_changes(tmp_path, capsys):
    from rsprune.fingerprint import MEMO, file_digest, fingerprints

    paths = _copies(tmp_path / "imgs", aid_paths(3))
    want = [file_digest(p) for p in paths]
    assert fingerprints(paths, tmp_path / "memo") == want
    memo = tmp_path / "memo" / MEMO
    assert memo.is_file() and fingerprints(paths, tmp_path / "memo") == want
    _overwrite(paths[:1], aid_paths(1, offset=9), keep_mtime=True)
    assert fingerprints(paths, tmp_path / "memo") == [file_digest(paths[0])] + want[1:] != want
    raw = bytearray(memo.read_bytes())
    raw[-20] ^= 1  # one flipped bit in an entry
    memo.write_bytes(bytes(raw))
    assert fingerprints(paths + [str(tmp_path / "gone.jpg")], tmp_path / "memo")[1:] == want[1:] + [""]
    assert "fingerprint memo" in capsys.readouterr().err
