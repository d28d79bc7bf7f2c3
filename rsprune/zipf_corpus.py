"""Imbalanced corpora: class folders cut to Zipf-like sizes, built as folders of symbolic links.

Each class of a source's class folders keeps a seeded draw of its images, the class sizes falling
geometrically by `factor` from `top`; the tree `<out>/<root_name>/<class>/<file>` links to the
shared images (nothing is copied; the folder names are read by evaluations only, never by a
selection). The same arguments give the same corpus on every machine (docs/notes/imbalanced-corpora.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rsprune.errors import UsageError

ROOT_NAME = "nwpu_zipf"


def zipf_sizes(n_classes: int, top: int, factor: float) -> list[int]:
    """Class sizes top * factor**(-i / (n - 1)), i = 0..n-1: a geometric (Zipf-like) fall by `factor`."""
    if n_classes < 2:
        return [int(top)] * n_classes
    return [int(round(top * factor ** (-i / (n_classes - 1)))) for i in range(n_classes)]


def build(source: str | Path, out: str | Path, top: int = 400, factor: float = 16.0, seed: int = 0,
          classes: list[str] | None = None, root_name: str = ROOT_NAME) -> Path:
    """Link the imbalanced corpus under `<out>/<root_name>`; returns that folder. `classes`: the
    source's class folders to use (None: all). Idempotent: an existing folder with the same links
    is kept, a different one is an error (never silently mixed)."""
    source = Path(source)
    if not source.is_dir():
        raise UsageError(f"class folders not found: {source} (set data_root= or RSPRUNE_DATA)")
    have = sorted(p.name for p in source.iterdir() if p.is_dir())
    missing = sorted(set(classes or []) - set(have))
    if missing:
        raise UsageError(f"classes not under {source}: {', '.join(missing)}")
    classes = sorted(classes) if classes else have
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))  # which class is large: a seeded draw, not the alphabet
    sizes = zipf_sizes(len(classes), top, factor)
    plan = {}
    for rank, ci in enumerate(order):
        files = sorted(f.name for f in (source / classes[ci]).iterdir())
        if sizes[rank] > len(files):
            raise ValueError(f"class {classes[ci]} has {len(files)} images, fewer than {sizes[rank]}")
        plan[classes[ci]] = sorted(files[i] for i in rng.choice(len(files), sizes[rank], replace=False))
    dst = Path(out) / root_name
    if dst.exists():
        have = {c.name: sorted(f.name for f in c.iterdir()) for c in dst.iterdir() if c.is_dir()}
        if have != plan:
            raise FileExistsError(f"{dst} holds another corpus; remove it or choose another out=")
        return dst
    tmp = dst.with_name(f".tmp-{root_name}-{os.getpid()}")
    for c, files in plan.items():
        (tmp / c).mkdir(parents=True)
        for f in files:
            (tmp / c / f).symlink_to((source / c / f).resolve())
    tmp.rename(dst)  # the whole tree appears at once
    return dst
