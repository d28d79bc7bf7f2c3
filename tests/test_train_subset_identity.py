"""A training run stays resumable when its subset's prune is rerun: the kept list is the identity.

The same prune command rerun (as a reproduction driver does) rewrites summary.json with new timings and
cache hits; a training run that recorded the old summary's hash must still resume, and a run whose
kept list changed must still be refused.
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from prune.run import run as prune
from rsprune.cli import UsageError
from rsprune.manifest import prune_run_hash
from rsprune.layout import check_config


def _cfg(h: dict):
    return OmegaConf.create({"seed": 0, "data": {"subset": h["kept"], "subset_hash": h}})


def test_rerun_prune_keeps_the_training_run_resumable(prune_cfg, tmp_path):
    out = tmp_path / "prune"
    prune(prune_cfg(run_dir=out))
    first = prune_run_hash(out)
    summary = (out / "summary.json").read_bytes()
    prune(prune_cfg(run_dir=out))  # the same command again: same kept list, a new summary
    second = prune_run_hash(out)
    assert second["kept_sha256"] == first["kept_sha256"]
    assert (out / "summary.json").read_bytes() != summary  # timings and cache hits: what made it fail

    run_dir = tmp_path / "train"
    run_dir.mkdir()
    check_config(run_dir, _cfg(first), write=True)
    check_config(run_dir, _cfg(second), write=False)  # resumes

    kept = out / "kept.txt"
    kept.write_text("".join(kept.read_text().splitlines(keepends=True)[1:]))  # another subset
    with pytest.raises(UsageError, match="kept_sha256"):
        check_config(run_dir, _cfg(prune_run_hash(out)), write=False)
    assert first["summary_sha256"] and second["summary_sha256"] != first["summary_sha256"]  # kept, as provenance
