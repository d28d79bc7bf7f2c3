"""Rebuild every table and figure under results/ from run folders: the README's numbers are never typed.

    python eval/tables.py [all|pruning|convergence|sr|semantic_synthesis] [sections.convergence.set.runs=[...]]

The sections are a registry in configs/eval/tables.yaml: each names a function `module:function`
that takes one config and writes its files, the config composed for it, and values merged into
that config (`set`: which run folders, where to write). A module adds a section by adding an
entry there; nothing here changes. Sections live in eval/ (or below): the tables read saved
run files and never import the commands that wrote them.

Nothing is skipped quietly: a registry entry naming an absent module or function is an error,
and so is a section whose runs are missing (rather than a "no runs yet" table written over a
committed one). `all` runs every section, names each that failed, and exits 2 at the end.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from omegaconf import DictConfig

from rsprune.cli import UsageError, main, one_line
from rsprune.sweeps import section_config


def resolve(fn: str) -> Callable:
    """'package.module:function' -> the function; UsageError when either is not there."""
    mod_name, _, attr = str(fn).partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):  # the section's own module, not one of its imports
            raise UsageError(f"module {mod_name} not found") from None
        raise
    if not attr or not hasattr(mod, attr):
        raise UsageError(f"{mod_name} has no function {attr!r}")
    return getattr(mod, attr)


def run_section(name: str, spec: DictConfig):
    print(f"== {name}", flush=True)
    fn = resolve(spec.fn)
    return fn(section_config(spec))


def run(cfg: DictConfig) -> dict:
    """Run one section, or all of them."""
    sections = cfg.sections
    which = str(cfg.section)
    if which != "all":
        if which not in sections:
            raise UsageError(f"unknown section {which!r}; choose all or one of {', '.join(sections)}")
        try:
            return {which: run_section(which, sections[which])}
        except UsageError as e:
            raise UsageError(f"section {which}: {one_line(e)}") from None
    done, failed = [], {}
    for name, spec in sections.items():
        try:
            run_section(name, spec)
            done.append(name)
        except UsageError as e:
            failed[name] = one_line(e)
            print(f"error in section {name}: {failed[name]}", file=sys.stderr)
    if failed:
        raise UsageError("sections failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {"done": done}


def argv_with_section(argv: list[str]) -> list[str]:
    """Turn the positional section name (`eval/tables.py convergence`) into `section=convergence`."""
    return [f"section={a}" if "=" not in a and not a.startswith("-") else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = argv_with_section(sys.argv[1:])
    main("eval/tables", run, __doc__)
