"""The default experiment's data split, drawn once before any pruning or training.

From the labelled data under `data.root`:
- reference: `reference_fraction` of each class folder of the scene benchmark (AID): what the
  scene strata are built from, never pruned, trained on or scored against;
- test: `test_fraction` of each class folder of the pool (the benchmark's rest + the other
  sources): the ONE test split every FD/KID/held-out loss of every run is measured on;
- corpus: the rest of the pool, what `prune/run.py` prunes and `data.subset=full` trains on.
Downstream test sets (nwpu12/test for SR, the Dubai test tiles) are outside the pool.

Each class is drawn by its own seeded permutation (seed, class name), so adding a class or a
source changes no other class's draw. The parts are then made disjoint by content, not only by
path: files with the same bytes (rsprune/fingerprint.py) in two parts go to the first part of
PRIORITY that holds one of them (reference, then test, then corpus); the copies in the other
parts are dropped from the split and listed, with their twin, in split.json's `dropped`. The three lists are written as list files
(rsprune/corpus.py) under `data.split.dir/<key>/` with `split.json` (sizes, sha256 of each list);
configs name them through the `${split:NAME}` resolver, so `data.corpus=[DIR]` on the command
line replaces the split's corpus by exactly the folders given.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from rsprune.errors import UsageError
from rsprune.corpus import is_list, list_files, read_list, write_list
from rsprune.imageio import list_images
from rsprune.markers import mark_cache

NAMES = ("corpus", "reference", "test")
PRIORITY = ("reference", "test", "corpus")  # a content twin stays in the first of these that holds it
_memo: dict = {}


def draw(classes: dict[str, list[str]], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(drawn, rest): round(fraction * n) items of each class, by a per-class seeded permutation."""
    drawn, rest = [], []
    for name in sorted(classes):
        items = sorted(classes[name])
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        take = set(rng.permutation(len(items))[:int(round(fraction * len(items)))].tolist())
        drawn += [p for i, p in enumerate(items) if i in take]
        rest += [p for i, p in enumerate(items) if i not in take]
    return sorted(drawn), sorted(rest)


def class_folders(root: str, source: str) -> dict[str, list[str]]:
    """`source/<class>/...` image paths relative to `root`, by class key `source/<class>`."""
    top = os.path.join(root, source)
    if not os.path.isdir(top):
        raise UsageError(f"split source folder not found: {top} (set data.root= or RSPRUNE_DATA)")
    out = {}
    for cls in sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))):
        out[f"{source}/{cls}"] = [f"{source}/{cls}/{p}" for p in list_images(os.path.join(top, cls))]
    if not out:
        raise UsageError(f"split source {top} has no class folders (<class>/<image>)")
    return out


def make_split(root: str, reference: str, pool: list[str], reference_fraction: float,
               test_fraction: float, seed: int) -> dict[str, list[str]]:
    """The three disjoint lists of paths relative to `root` (pure, apart from listing files)."""
    for name, f in (("reference_fraction", reference_fraction), ("test_fraction", test_fraction)):
        if not 0 <= float(f) < 1:
            raise UsageError(f"data.split.{name} must be in [0, 1), got {f!r}")
    ref_classes = class_folders(root, reference)
    ref, ref_rest = draw(ref_classes, reference_fraction, seed)
    pooled: dict[str, list[str]] = {}
    for source in pool:
        classes = class_folders(root, source)
        if source == reference:  # the benchmark's images outside the reference join the pool
            keep = set(ref_rest)
            classes = {k: [p for p in v if p in keep] for k, v in classes.items()}
        pooled.update(classes)
    test, corpus = draw(pooled, test_fraction, seed)
    return {"corpus": corpus, "reference": ref, "test": test}


def content_disjoint(root: str, lists: dict[str, list[str]], memo_dir=None) -> tuple[dict, list[dict]]:
    """(lists, dropped): each group of byte-identical files kept only in the first part of
    PRIORITY that holds one of them; `dropped` names every copy removed from another part.
    Copies within one part stay (the prune index marks them); unreadable files stay where drawn."""
    from rsprune.fingerprint import fingerprints

    order = [(name, rel) for name in PRIORITY for rel in lists[name]]
    hashes = fingerprints([os.path.join(root, rel) for _, rel in order], memo_dir)
    home: dict[str, tuple[str, str]] = {}
    for (name, rel), h in zip(order, hashes):
        if h:
            home.setdefault(h, (name, rel))  # lists are sorted: the twin named is the first one
    kept = {name: [] for name in lists}
    dropped = []
    for (name, rel), h in zip(order, hashes):
        part, twin = home.get(h, (name, rel))
        if part == name:
            kept[name].append(rel)
        else:
            dropped.append({"path": rel, "part": name, "kept_in": part, "same_as": twin,
                            "reason": f"same bytes as an image of the {part} split"})
    return kept, dropped


def materialise(split_cfg, root: str, memo_dir=None) -> Path:
    """Write (once) the split's list files and split.json; return their folder. `memo_dir`
    holds the fingerprint memo (default: beside the split's folders, so that composing a config
    writes nothing under its cache_dir)."""
    root = os.path.abspath(str(root))
    params = dict(reference=str(split_cfg.reference), pool=[str(p) for p in split_cfg.pool],
                  reference_fraction=float(split_cfg.reference_fraction),
                  test_fraction=float(split_cfg.test_fraction), seed=int(split_cfg.seed))
    memo_key = (root, json.dumps(params, sort_keys=True), str(split_cfg.dir))
    if memo_key in _memo:
        return _memo[memo_key]
    split_dir = Path(os.path.abspath(str(split_cfg.dir)))
    lists, dropped = content_disjoint(root, make_split(root, **params), memo_dir or split_dir / "fingerprints")
    key = hashlib.sha256(json.dumps([params, lists, dropped], sort_keys=True).encode()).hexdigest()[:16]
    out = split_dir / key
    mark_cache(split_dir)  # a cache folder: no corpus walk enters it
    if not (out / "split.json").is_file():
        comment = f"rsprune default split {key}: " + json.dumps(params, sort_keys=True)
        for name in NAMES:
            write_list(out / f"{name}.txt", [os.path.join(root, p) for p in lists[name]], base=root,
                       comment=f"{name} of {comment}")
        from rsprune.cache import write_json
        write_json(out / "split.json", {"key": key, "root": root, "params": params,
                                        **{n: describe(out / f"{n}.txt") for n in NAMES},
                                        "dropped": dropped})
    _memo[memo_key] = out
    return out


def describe(entry) -> dict:
    """{path, n, sha256}: an image set by its size and the hash of its sorted relative paths."""
    files = list_files([str(entry)])
    rel = sorted(f"{r}/{p}" for r, p in zip(files.root, files.relpath))
    return {"path": str(entry), "n": len(rel),
            "sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest()}


def record(data_cfg) -> dict:
    """What a run folder stores as split.json: each data set it was given, described."""
    out = {}
    for name in NAMES:
        entry = data_cfg.get(name)
        if entry is None:
            continue
        entries = [entry] if isinstance(entry, str) else list(entry)
        out[name] = [describe(e) for e in entries]
    return out


def paths(entry) -> list[str]:
    """Absolute image paths of a data entry (folder, list file, or a list of them), sorted."""
    entries = [entry] if isinstance(entry, str) else list(entry)
    if len(entries) == 1 and is_list(str(entries[0])):
        return sorted(read_list(str(entries[0])))
    return sorted(list_files([str(e) for e in entries]).path)


_undrawn = [False]


@contextlib.contextmanager
def undrawn():
    """Within it, `${split:NAME}` resolves to a placeholder: a config is checked before its split
    is drawn and written (rsprune.cli.compose's precheck)."""
    _undrawn[0] = True
    try:
        yield
    finally:
        _undrawn[0] = False


def _resolve(name: str, *, _root_) -> str:
    if name not in NAMES:
        raise UsageError(f"${{split:{name}}}: expected one of {', '.join(NAMES)}")
    if _undrawn[0]:
        return f"<split {name}: not drawn yet>"
    data = _root_.data
    try:
        return str(materialise(data.split, str(data.root)) / f"{name}.txt")
    except UsageError as e:
        # Not raised here: a user who names their own corpus and reference on a data root without
        # the split's sources must still compose; whoever reads this entry reports it in one line.
        return f"<split unavailable: {e}>"


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("split"):
        OmegaConf.register_new_resolver("split", _resolve)
