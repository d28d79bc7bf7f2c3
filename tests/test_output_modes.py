"""Outputs follow the umask: a team that shares run and cache folders can read what a run wrote.

The atomic writer makes its temporary with mkstemp (mode 0600 whatever the umask); every file it
renames into place must get the mode a plain open() would have given (0666 & ~umask).
"""
from __future__ import annotations

import os
import stat

import pytest

from prune.run import run as prune


def _modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_prune_outputs_and_cache_entries_follow_the_umask(prune_cfg, tmp_path, mask):
    old = os.umask(mask)
    try:
        run_dir, cache = tmp_path / "run", tmp_path / "cache"
        prune(prune_cfg(run_dir=run_dir, cache_dir=cache))
    finally:
        os.umask(old)
    written = _modes(run_dir) | {f"cache/{k}": v for k, v in _modes(cache).items()}
    for name in ("kept.txt", "manifest.parquet", "summary.json"):
        assert name in written
    assert any(k.startswith("cache/") for k in written)
    wrong = {k: oct(v) for k, v in written.items() if v != 0o666 & ~mask}
    assert not wrong, f"modes other than {oct(0o666 & ~mask)}: {wrong}"
