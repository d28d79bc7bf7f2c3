"""Shared fixtures: the REAL configs, shrunk, on small real corpora linked from ../shared/data.

Corpora are folders of symbolic links to real shared images (nothing is copied); one cache
folder per session is shared by the pipeline tests, so each image is embedded once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rsprune.cli import compose

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSPRUNE_DATA", ROOT.parent / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"shared data not found at {DATA} (set RSPRUNE_DATA)")
        for item in items:
            item.add_marker(skip)


def link_images(dst: Path, src_root: Path, per_class: int, offset: int = 0) -> Path:
    """dst/<class>/<file> -> symlinks to `per_class` sorted images of each class folder."""
    for cls in sorted(p for p in src_root.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())[offset:offset + per_class]
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


@pytest.fixture
def one_thread():
    """One torch thread: on the shared 2-core machine it is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """240 real NWPU images: 20 of each of the 12 classes."""
    return link_images(tmp_path_factory.mktemp("corpus") / "nwpu", DATA / "nwpu12" / "train", 20)


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory) -> Path:
    """300 real AID images: 10 of each of the 30 scene classes."""
    return link_images(tmp_path_factory.mktemp("reference") / "aid", DATA / "aid", 10)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def shrunk_overrides(corpus, reference, run_dir, cache_dir, *extra) -> list[str]:
    """The real prune config, pointed at small corpora and test folders."""
    return [f"data.corpus=[{corpus}]", f"data.reference={reference}", f"run_dir={run_dir}",
            f"cache_dir={cache_dir}", "index.num_workers=0", "embed.shard_size=128",
            "clustering.min_sample=50", "clustering.cluster_size=10", "report.enabled=false", *extra]


@pytest.fixture
def prune_cfg(small_corpus, small_reference, session_cache, tmp_path):
    """Factory: compose the shrunk real config with extra overrides."""
    def make(*extra, run_dir=None, cache_dir=None):
        return compose("prune", shrunk_overrides(small_corpus, small_reference, run_dir or tmp_path / "run",
                                                 cache_dir or session_cache, *extra))
    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 6-step training run of the real train config, shrunk (tiny UNet, 32 px, 24 AID images):
    checkpoints at steps 3 and 6. Read it; train a copy to change it."""
    from train.main import run
    from train_fixtures import aid_paths, tiny_overrides, write_kept

    root = tmp_path_factory.mktemp("tiny-run")
    kept = write_kept(root / "prune", aid_paths(24))
    run(compose("train", tiny_overrides(kept, root / "run", root / "cache")))
    return root / "run"
