"""The raw-corpus builder: deterministic from its seed, labels kept apart, and no selection reads them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsprune import rawcorpus
from rsprune.cli import compose

from conftest import shrunk_overrides


def raw_cfg(source, out, seed=0):
    return compose("raw_corpus", [f"data.raw.source={source}", f"data.raw.dir={out}", f"data.raw.seed={seed}",
                                  "data.raw.dominant=[nwpu/desert,nwpu/forest]", "data.raw.dominant_sources=12",
                                  "data.raw.minor_top=3", "data.raw.minor_min=1"])


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jpg"))}


def test_same_seed_same_corpus_other_seed_other(small_corpus, tmp_path):
    a = rawcorpus.materialise(raw_cfg(small_corpus, tmp_path / "a").data.raw, str(small_corpus), False)
    b = rawcorpus.materialise(raw_cfg(small_corpus, tmp_path / "b").data.raw, str(small_corpus), False)
    c = rawcorpus.materialise(raw_cfg(small_corpus, tmp_path / "c", seed=1).data.raw, str(small_corpus), False)
    ta, tb, tc = tree(a / "tiles"), tree(b / "tiles"), tree(c / "tiles")
    assert ta == tb and len(ta) > 100
    assert ta != tc
    lab = rawcorpus.labels(a)
    assert sorted(lab["tile"]) == sorted(ta) and dict(zip(lab["tile"], lab["sha256"])) == ta
    # the mix: every noise kind present, dominant classes the majority, exact copies byte-identical
    assert set(rawcorpus.NOISE_KINDS) <= set(lab["kind"])
    clean = lab[lab["kind"] == "clean"]
    assert clean["class"].isin(["nwpu/desert", "nwpu/forest"]).mean() > 0.5
    dup = lab[lab["kind"] == "duplicate"]
    assert len(dup) and dup["sha256"].isin(clean["sha256"]).all()
    # names carry no label: no class or kind string in any tile path
    names = " ".join(lab["tile"])
    assert not any(k in names for k in ("desert", "forest", "cloud", "blur", "sea"))
    # several tiles per source image (overlapping crops)
    assert clean.groupby("source").size().min() >= 2


def test_no_selection_reads_the_labels(small_corpus, small_reference, tmp_path):
    """Prune the raw corpus, scramble its labels file, prune again on a cold cache: the same kept set."""
    folder = rawcorpus.materialise(raw_cfg(small_corpus, tmp_path / "raw").data.raw, str(small_corpus), False)
    from prune.run import run

    kept = []
    for i in range(2):
        cfg = compose("prune", shrunk_overrides(folder / "tiles", small_reference, tmp_path / f"run{i}",
                                                tmp_path / f"cache{i}", "ratio=0.85"))
        run(cfg)
        kept.append((tmp_path / f"run{i}" / "kept.txt").read_text())
        lab = pd.read_parquet(folder / "labels.parquet")
        rng = np.random.default_rng(i)
        for col in ("class", "kind", "source"):
            lab[col] = lab[col].to_numpy()[rng.permutation(len(lab))]
        os.remove(folder / "labels.parquet")
        lab.to_parquet(folder / "labels.parquet")
    assert kept[0] == kept[1] and kept[0].count("\n") > 10


def test_the_raw_config_passes_the_precheck_without_drawing_or_building(tmp_path):
    """`python prune/run.py +experiment=ratio85 data=raw` (docs/raw-corpus.md): the command line
    checks values before the split is drawn, and the raw corpus, built from the split's corpus,
    must wait for it too (the placeholder was taken for a corpus path: exit 2)."""
    from rsprune.errors import UsageError

    seen = []

    def precheck(cfg):
        seen.append(list(cfg.data.corpus))
        raise UsageError("stop here")  # the real compose would now draw the split and build the corpus

    with pytest.raises(UsageError, match="^stop here$"):
        compose("prune", ["+experiment=ratio85", "data=raw", f"run_dir={tmp_path / 'run'}",
                          f"cache_dir={tmp_path / 'cache'}", f"data.raw.dir={tmp_path / 'raw'}"], precheck)
    assert seen == [["<raw tiles: not built yet>"]]
    assert sorted(os.listdir(tmp_path)) == []
