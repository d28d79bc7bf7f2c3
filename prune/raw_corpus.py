"""Build the raw corpus (redundant, imbalanced, noisy; hidden labels): `python prune/raw_corpus.py`.

The tiles go to `data.raw.dir/<key>/tiles/` and the labels (tile, source, class, kind) to
`labels.parquet` beside them, which no selection reads. Rerunning with the same parameters
reuses the folder; `data=raw` in the prune and train commands builds the same one on first use.
"""
from __future__ import annotations

from rsprune import rawcorpus


def run(cfg) -> dict:
    folder = rawcorpus.materialise(cfg.data.raw, str(cfg.data.raw.source))
    print(rawcorpus.describe(folder))
    print(f"corpus: {folder / 'tiles'}\nlabels: {folder / 'labels.parquet'}")
    return {"folder": str(folder), "tiles": str(folder / "tiles"), "labels": str(folder / "labels.parquet")}


if __name__ == "__main__":
    from rsprune.cli import main

    main("raw_corpus", run, __doc__)
