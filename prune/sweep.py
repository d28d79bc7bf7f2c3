"""Run (or reuse) every prune run a results section reads, before `eval/tables.py` reads them.

    python prune/sweep.py pruning        # every method x ratio x seed of configs/eval/subset_quality.yaml
    python prune/sweep.py all            # pruning, ablation, imbalanced, imbalanced_heldout, raw
    python prune/sweep.py ablation sections.ablation.set.ablation.seeds=[0]

The section's config is the one `eval/tables.py` composes (configs/eval/tables.yaml: `config`
and `set`); which runs it names, and their folders, come from rsprune/sweeps.py. A run whose
folder already holds a summary of the same config is reused; imbalanced corpora (symlink trees)
are built first. Then `python eval/tables.py SECTION` writes the table from the run folders.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from rsprune import sweeps, zipf_corpus
from rsprune.cli import UsageError, main


def run_plan(plan: sweeps.Plan, progress: bool = True) -> list[str]:
    """Build the plan's corpora, then run each prune run not already finished; its run folders."""
    from prune.run import run as prune_run

    for corpus in plan.corpora:
        zipf_corpus.build(**corpus)
    for r in plan.runs:
        cfg = sweeps.prune_config(r)
        if not sweeps.finished(r, cfg):
            print(f"[sweep] {r.run_dir}", flush=True)
            prune_run(cfg, progress=progress)
    return [r.run_dir for r in plan.runs]


def run_section(name: str, cfg: DictConfig, progress: bool = True) -> list[str]:
    return run_plan(sweeps.PLANS[name](cfg), progress)


def run(cfg: DictConfig) -> dict:
    which = str(cfg.section)
    names = list(sweeps.PLANS) if which == "all" else [which]
    for name in names:
        if name not in sweeps.PLANS:
            raise UsageError(f"section {name!r} reads no prune sweep; choose all or one of {', '.join(sweeps.PLANS)}")
        if name not in cfg.sections:
            raise UsageError(f"section {name!r} is not in configs/eval/tables.yaml")
    out = {}
    for name in names:
        print(f"== {name}", flush=True)
        out[name] = len(run_section(name, sweeps.section_config(cfg.sections[name])))
    return out


if __name__ == "__main__":
    sys.argv[1:] = [f"section={a}" if "=" not in a and not a.startswith("-") else a for a in sys.argv[1:]]
    main("eval/tables", run, __doc__)
