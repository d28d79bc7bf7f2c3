"""The one place a prune config is checked: every enumerated and numeric value, the corpus and
the reference, before any stage runs or anything is written. A bad value is a UsageError (one
line, exit code 2), never a late traceback or a silent coercion (2.5 workers, `within=magic`).

A new config key gets its row in CHOICES or NUMBERS below (`method.*` rows apply when the
method's config has the key).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from prune import methods
from prune.budget import budget as budget_of
from prune.index import walk
from prune.scenes import check_scenes, reference_labels
from rsprune import knn
from rsprune.checks import check_table, get
from rsprune.cache import check_writable
from rsprune.corpus import is_list
from rsprune.errors import UsageError

WITHIN = ("nearest", "farthest", "spread", "cover", "random")
# Enumerated values: key -> allowed values.
CHOICES = {
    "entropy.score": ("local", "global"),
    "embed.dtype": ("float16", "float32"),
    "scenes.assign": ("prototype", "knn", "folder"),
    "clustering.k_rule": ("size", "sqrt"),
    "selection.within": WITHIN,
    "selection.mass": ("count", "volume", "auto"),
    "faiss.gpu": ("auto", True, False),
    "report.enabled": (True, False),
    "method.entropy_filter": (True, False),
    "method.keep": ("hard", "easy"),
    "method.within": WITHIN,
    "method.d_inter": ("centroids", "member_means"),
    "method.quotas": ("qp", "waterfill"),
}
# Numbers: key -> (int or float, lowest, highest, lowest allowed, highest allowed).
NUMBERS = {
    "seed": (int, 0, math.inf, True, False),
    "index.shard_size": (int, 1, math.inf, True, False),
    "index.num_workers": (int, 0, math.inf, True, False),
    "entropy.grid": (int, 1, math.inf, True, False),
    "entropy.max_side": (int, 8, math.inf, True, False),
    "entropy.floor": (float, 0, 8, True, True),  # bits of a 256-bin histogram
    "entropy.percentile": (float, 0, 100, True, True),
    "selection.core": (float, 0, 1, False, True),
    "entropy.area_grid": (int, 1, math.inf, True, False),
    "entropy.flat_bits": (float, 0, 8, True, True),
    "entropy.bright": (float, 0, 256, True, True),
    "entropy.min_area": (float, 0, 1, True, True),
    "entropy.min_sharpness": (float, 0, 9, True, True),  # bits of a difference histogram; null: off
    "embed.shard_size": (int, 1, math.inf, True, False),
    "scenes.per_class": (int, 1, math.inf, True, False),
    "scenes.knn": (int, 1, math.inf, True, False),
    "method.levels": (int, 1, math.inf, True, False),
    "method.branching": (float, 1, math.inf, False, False),
    "method.min_share": (float, 0, 1, True, True),
    "method.dedup": (float, 0, 1, False, True),
    "clustering.cluster_size": (float, 0, math.inf, False, False),
    "clustering.sqrt_scale": (float, 0, math.inf, False, False),
    "clustering.max_k": (int, 1, math.inf, True, False),
    "clustering.sample_fraction": (float, 0, 1, False, True),
    "clustering.min_sample": (int, 1, math.inf, True, False),
    "clustering.niter": (int, 1, math.inf, True, False),
    "clustering.refine": (int, 0, math.inf, True, False),
    "selection.alpha": (float, 0, math.inf, True, False),
    "selection.dedup": (float, 0, 1, False, True),  # a cosine; 1 turns near-duplicate skipping off
    "selection.dull_z": (float, 0, math.inf, True, False),  # robust deviations; null: off
    "selection.volume.k": (int, 2, math.inf, True, False),  # the dimension estimate needs 2 neighbours
    "selection.volume.min_stratum": (int, 1, math.inf, True, False),
    "report.montage_scenes": (int, 0, math.inf, True, False),
    "encoder.batch_size": (int, 1, math.inf, True, False),
    "encoder.resolution": (int, 32, math.inf, True, False),  # EfficientNet's stride: smaller inputs fail in a conv
    "encoder.num_workers": (int, 0, math.inf, True, False),
    "method.neighbours": (int, 1, math.inf, True, False),
    "method.temperature": (float, 0, math.inf, False, False),
}


@dataclass
class Plan:
    """What validation found: the inputs every stage reads."""
    corpus: list[str]          # corpus entries (folders)
    method: object             # the method module (prune/methods/<name>.py)
    files: pd.DataFrame        # walk(corpus): every corpus file
    budget: int                # images to keep
    reference: str | None      # the reference folder, when the method needs scenes


def check_values(cfg: DictConfig) -> None:
    """Every enumerated and numeric value (keys absent from this config are skipped)."""
    ratio = cfg.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < float(ratio) < 1:
        raise UsageError(f"ratio must be a number strictly between 0 and 1 (the fraction pruned), got {ratio!r}")
    check_table(cfg, CHOICES, NUMBERS)
    if get(cfg, "scenes") is not None:
        check_scenes(cfg.scenes)  # threshold: reference | corpus | a cosine; quantile; pseudo_size
    dim = get(cfg, "selection.volume.dim")
    if dim is not None and dim != "auto" and (isinstance(dim, bool) or not isinstance(dim, (int, float))
                                              or not 0 < dim < math.inf):
        raise UsageError(f"selection.volume.dim must be auto or a number > 0, got {dim!r}")
    threads = cfg.faiss.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"faiss.threads must be a positive integer or null (all cores), got {threads!r}")


def check_reference(ref: str) -> None:
    """The reference is a folder (or .txt list) of >= 2 class folders (which classes are
    readable is the scenes stage's business: it drops a class with no readable file)."""
    if not (os.path.isdir(ref) or is_list(ref)):
        raise UsageError(f"reference folder (or .txt list) not found: {ref}")
    reference_labels(walk([ref]).relpath.tolist())


def precheck(cfg: DictConfig) -> None:
    """What needs neither the data nor its split: every value, and that run_dir and cache_dir can
    be written (rsprune.cli.compose runs it before the default split is drawn)."""
    check_values(cfg)
    check_writable(str(cfg.run_dir), "run_dir")
    check_writable(str(cfg.cache_dir), "cache_dir")


def validate(cfg: DictConfig) -> Plan:
    """Every check that can fail on user input, before anything is written."""
    precheck(cfg)
    corpus = cfg.data.corpus
    corpus = [corpus] if isinstance(corpus, str) else list(corpus or [])
    if not corpus:
        raise UsageError("data.corpus is empty: give one or more folders, e.g. data.corpus=[DIR1,DIR2]")
    method = methods.get(str(cfg.method.name))
    files = walk([str(c) for c in corpus], exclude=[str(cfg.run_dir), str(cfg.cache_dir)])
    budget = budget_of(len(files), float(cfg.ratio))
    if budget < 1:
        raise UsageError(f"ratio={cfg.ratio} keeps round((1 - ratio) * {len(files)} files) = 0 images: "
                         "nothing to select; lower the ratio")
    ref = None
    if "scenes" in method.NEEDS and cfg.scenes.assign == "folder":
        reference_labels(files.relpath.tolist(), "corpus")  # strata from the corpus's folders: no reference
    elif "scenes" in method.NEEDS:
        ref = str(cfg.data.reference)
        check_reference(ref)
    knn.use_gpu(cfg.faiss.gpu)  # faiss.gpu=true without a GPU stops here, before anything is written
    knn.set_threads(cfg.faiss.threads)
    return Plan([str(c) for c in corpus], method, files, budget, ref)
