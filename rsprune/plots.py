"""Figures: one headless pyplot and one atomic PNG save for every stage that draws."""
from __future__ import annotations

import os

from rsprune.cache import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on a cluster node or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, tight: bool = False) -> None:
    """Write `fig` to `path` at 110 dpi through a temporary name (a killed run leaves no half
    PNG), then close it. `tight` crops to the drawn content (bbox_inches="tight")."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
