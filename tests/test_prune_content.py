"""The embedding store holds a vector under a content hash only if it was computed from those
bytes: a file replaced between the index and the embedding is refused and recorded."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, shrunk_overrides
from rsprune.embed_store import CHANGED, embed_stage
from prune.index import index_inputs
from prune.run import run
from prune.validate import validate
from rsprune.cli import compose
from rsprune.manifest import read_kept, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """36 real NWPU images (3 of each class) as copies: files that can be rewritten."""
    out = tmp_path / "corpus"
    for cls in sorted((DATA / "nwpu12" / "test").iterdir()):
        (out / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:3]:
            shutil.copyfile(f, out / cls.name / f.name)
    return out


def _cfg(corpus, run_dir, cache):
    return compose("prune", shrunk_overrides(corpus, corpus, run_dir, cache, "method=kmeans_uniform", "ratio=0.5",
                                             "embed.shard_size=16", "encoder.num_workers=0"))


def _swap_keeping_stat(path: Path, data: bytes) -> None:
    """Write other bytes into `path` with its size and mtime unchanged (the index's key): the
    cached index then holds a sha1 the file no longer has, as if it changed mid-prune."""
    st = path.stat()
    assert len(data) <= st.st_size
    path.write_bytes(data + bytes(st.st_size - len(data)))  # zeros after a JPEG's end are ignored
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _sha1(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def test_a_file_replaced_after_the_index_is_refused_and_never_poisons_the_store(corpus, tmp_path):
    files = sorted(corpus.rglob("*.jpg"), key=lambda p: p.stat().st_size)
    victim, other = files[-1], files[0]  # the largest, replaced by the smallest (which fits)
    original = victim.read_bytes()
    cache = tmp_path / "cache"
    cfg = _cfg(corpus, tmp_path / "run", cache)
    index_inputs(validate(cfg), cfg, str(cache), progress=False)  # stage 0 done, the embedding not yet
    _swap_keeping_stat(victim, other.read_bytes())

    run(cfg, progress=False)
    m = read_manifest(tmp_path / "run").set_index("path")
    row = m.loc[str(victim)]
    assert not row.readable and row.error == CHANGED and row.reason == "unreadable"
    assert str(victim) not in read_kept(tmp_path / "run")
    assert m.readable.sum() == len(m) - 1
    stored = np.concatenate([np.load(p) for p in cache.glob("embed/*/*.ids.npy")]).tolist()
    assert hashlib.sha1(original).hexdigest() not in stored  # no vector of other bytes under its hash

    # Restored (same bytes, same stat): the same selection as a clean cache, the short shard redone.
    _swap_keeping_stat(victim, original)
    run(_cfg(corpus, tmp_path / "again", cache), progress=False)
    run(_cfg(corpus, tmp_path / "clean", tmp_path / "clean-cache"), progress=False)
    assert read_kept(tmp_path / "again") == read_kept(tmp_path / "clean")
    m2 = read_manifest(tmp_path / "again")
    assert m2.readable.all()
    stored = np.concatenate([np.load(p) for p in cache.glob("embed/*/*.ids.npy")]).tolist()
    assert hashlib.sha1(original).hexdigest() in stored


def test_a_changed_file_falls_back_to_its_exact_duplicate(corpus, tmp_path):
    files = sorted(corpus.rglob("*.jpg"))[:3]
    twin = tmp_path / "twin.jpg"
    shutil.copyfile(files[0], twin)
    h = _sha1(files[0])
    cfg = compose("prune", shrunk_overrides(corpus, corpus, tmp_path / "run", tmp_path / "cache",
                                            "embed.shard_size=16", "encoder.num_workers=0"))
    files[0].write_bytes(files[1].read_bytes())  # no longer holds the bytes h names
    items = {h: [str(files[0]), str(twin)], _sha1(files[2]): [str(files[2])]}
    plan, store, _, refused = embed_stage(items, cfg, str(tmp_path / "cache"), progress=False)
    assert refused == {str(files[0]): CHANGED}
    ids = np.load(store / f"{plan[0][0]}.ids.npy").tolist()
    assert sorted(ids) == sorted(items)  # h embedded from the twin, which still holds its bytes
