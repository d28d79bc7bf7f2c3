"""Marker files that keep a run's or a cache's own files out of every corpus walk.

Each run folder (prune, training) holds `.rsprune-run`, each cache folder (cache_dir, the split's
folder) `.rsprune-cache`. rsprune.imageio.list_images never enters a folder holding a marker, so
report PNGs, sample grids and cached images never become corpus images, whichever run wrote them
and wherever it put them. A corpus root that is itself a run folder (run_dir=CORPUS) is still
walked, all but the run's own output folders (RUN_OUTPUTS).
"""
from __future__ import annotations

import os
from pathlib import Path

RUN_MARKER = ".rsprune-run"
CACHE_MARKER = ".rsprune-cache"
MARKERS = (RUN_MARKER, CACHE_MARKER)
# What a run writes images (or anything else) into, beside its top-level files: prune's report,
# training's samples, generated sets, checkpoints, snapshots and held-out losses.
RUN_OUTPUTS = ("report", "samples", "generated", "checkpoints", "snapshots", "heldout")

_TEXT = {RUN_MARKER: "an rsprune run folder: corpus walks skip it\n",
         CACHE_MARKER: "an rsprune cache folder: corpus walks skip it\n"}


def mark(folder, marker: str) -> None:
    """Create `folder` (if needed) with its marker file; a write error names the path."""
    from rsprune.cache import write_text

    path = Path(folder) / marker
    if not path.is_file():
        write_text(path, _TEXT[marker])


def mark_run(folder) -> None:
    mark(folder, RUN_MARKER)


def mark_cache(folder) -> None:
    mark(folder, CACHE_MARKER)


def marked(folder) -> str | None:
    """The marker `folder` holds, or None."""
    return next((m for m in MARKERS if os.path.isfile(os.path.join(folder, m))), None)
