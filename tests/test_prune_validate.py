"""Every enumerated and numeric prune config value is checked before any stage runs: a bad one
is a UsageError (one line, exit code 2) and nothing is written, neither run folder nor cache."""
from __future__ import annotations

import pytest

from conftest import shrunk_overrides
from prune.run import run
from rsprune.cli import UsageError, compose

BAD = [
    ("selection.within=magic", "selection.within"),
    ("clustering.k_rule=cube", "clustering.k_rule"),
    ("scenes.assign=vote", "scenes.assign"),
    ("method=prototypes method.keep=soft", "method.keep"),
    ("method=density method.within=nearst", "method.within"),
    ("method=density method.temperature=0", "method.temperature"),
    ("seed=-1", "seed"),
    ("seed=1.5", "seed"),
    ("entropy.grid=0", "entropy.grid"),
    ("entropy.percentile=150", "entropy.percentile"),
    ("entropy.score=mean", "entropy.score"),
    ("clustering.cluster_size=0", "clustering.cluster_size"),
    ("clustering.sample_fraction=1.5", "clustering.sample_fraction"),
    ("index.num_workers=2.5", "index.num_workers"),
    ("embed.dtype=int8", "embed.dtype"),
    ("faiss.gpu=maybe", "faiss.gpu"),
    ("selection.dedup=abc", "selection.dedup"),
    ("report.enabled=1", "report.enabled"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[1] + ":" + b[0].split("=")[-1] for b in BAD])
def test_bad_value_refused_before_any_stage(override, key, small_corpus, small_reference, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose("prune", shrunk_overrides(small_corpus, small_reference, run_dir, cache, *override.split()))
    with pytest.raises(UsageError) as e:
        run(cfg, progress=False)
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg
    assert not run_dir.exists() and not cache.exists()


def test_good_values_of_every_kind_pass(prune_cfg, tmp_path):
    """Ints where floats are allowed, booleans where booleans are: no false refusals."""
    from prune.validate import validate

    plan = validate(prune_cfg("clustering.cluster_size=10", "selection.alpha=1", "scenes.threshold=-0.5",
                              "faiss.gpu=false", "method=density", "method.within=spread"))
    assert plan.budget == round(0.15 * 240) and plan.reference is None  # density needs no scenes
