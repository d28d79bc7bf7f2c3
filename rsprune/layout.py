"""Where things live: the one declaration of run-folder and cache names.

Every module that writes or reads a training/fine-tuning run folder or a cache entry takes its
names from here, so a layout change is one edit (and readers never guess a spelling).

A run folder (train/main.py, downstream/sr.py, downstream/semantic_synthesis.py):

    .lock                         the running command's exclusive lock and pid (rsprune/runlock.py)
    config.yaml                   resolved config, written after the first trained step (a rerun must match it)
    metrics.jsonl                 one JSON record a line (loss, lr, held-out loss, sample stats, ...)
    split.json                    the test split this run is scored against (file list hash, sizes)
    checkpoints/step_XXXXXXX/     full resumable states (rotated by checkpoints_total_limit)
    snapshots/step_XXXXXXX/       light EMA weights on a schedule (never rotated): what curves score
    samples/step_XXXXXXX.png      EMA sample grids (fixed seed)
    heldout/step_XXXXXXX.npy      per-image held-out losses (n_images, n_timesteps) float32 (+ .sha256)
    heldout/index.json            their rows (test-split paths and classes), timesteps and noise seed
    generated/step_XXXXXXX-n<N>-s<seed>/  N samples, one PNG each (train/sample.py)

A rerun in a run folder must match its config.yaml, except for the keys in MAY_DIFFER
(`check_config`, called by train/ and downstream/ before anything is written).
"""
from __future__ import annotations

import re
from pathlib import Path

# --- run folders ---
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SPLIT = "split.json"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
SAMPLES = "samples"
HELDOUT = "heldout"
HELDOUT_INDEX = "index.json"
GENERATED = "generated"  # train/sample.py: N samples of a step, one PNG each
TMP_PREFIX = ".tmp-"  # a folder being written; renamed to its final name when complete

_STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_name(step: int) -> str:
    return f"step_{int(step):07d}"


def parse_step(name: str) -> int | None:
    """The step of a `step_XXXXXXX` name, None for anything else (temporary folders included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def snapshot_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / step_name(step)


def sample_path(run_dir, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"{step_name(step)}.png"


def heldout_path(run_dir, step: int) -> Path:
    return Path(run_dir) / HELDOUT / f"{step_name(step)}.npy"


def step_folders(parent) -> list[tuple[int, Path]]:
    """(step, path) of every `step_XXXXXXX` folder under `parent`, oldest first; completeness
    is the caller's check (each kind of folder knows which files it needs)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    out = [(parse_step(p.name), p) for p in parent.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in out if s is not None)


# --- cache sub-folders (under cache_dir) ---
CACHE_INDEX = "index"          # prune stage 0 tables and shards
CACHE_EMBED = "embed"          # prune stage 2 embedding stores
CACHE_SCENES = "scenes"        # prune stage 3
CACHE_CLUSTERS = "clusters"    # prune stage 4
CACHE_RAY = "ray"              # engine=ray: each task's result file, by run content and step
CACHE_SPLIT = "split"          # the default data split's list files
CACHE_LATENTS = "latents"      # first-stage latents of training sets
CACHE_FIRST_STAGE = "autoencoders"  # fitted autoencoders (kl_small)
CACHE_FID = "fid"              # feature statistics of reference sets
CACHE_DOWNSTREAM = "downstream"    # downstream latents and the segmentation judge
CACHE_FINGERPRINTS = "fingerprints"  # content hashes of files, memoised by stat (rsprune/fingerprint.py)


def cache_path(cache_dir, kind: str, *parts: str) -> Path:
    """`cache_dir/<kind>/<parts...>` for one of the CACHE_* kinds above."""
    return Path(cache_dir, kind, *parts)


MAX_RECORD = 1 << 20  # bytes: a metrics record is a few kB; a longer line is not read whole


def read_metrics(path, max_record: int = MAX_RECORD):
    """Yield (line, record) of a metrics.jsonl, streaming: memory stays bounded by `max_record`.
    A line longer than that is skipped with a warning; a line that is not a JSON object (torn by a
    kill mid-write) ends the log with a warning, as training's resume treats it."""
    import json

    from rsprune.errors import warn

    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(max_record + 1), b""), 1):
            if len(raw) > max_record:
                while raw and not raw.endswith(b"\n"):  # drain the rest of the long line
                    raw = f.readline(max_record)
                warn(f"{path}: skipped line {n}, a record over {max_record} bytes")
                continue
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                warn(f"{path}: dropped a torn line {n} and everything after it")
                return
            yield line, record


LOCK = ".lock"  # flock'ed by the one run writing the folder (rsprune/runlock.py); holds its pid
# --- the config a run folder holds ---
# Config keys a rerun in the same run_dir may change: none alters the training trajectory up to the
# resumed step (max_steps may grow, which is how a run is extended; a cosine decay_steps that
# follows it stretches the schedule from the resumed step on). A prefix ending in "." covers a section.
# The kept list's sha256 is the subset's identity; its prune run's summary.json also carries timings and
# cache hits, which change each time the same prune is rerun, so its hash is provenance only.
MAY_DIFFER = ("data.subset_hash.summary_sha256",
              "train.max_steps", "optim.decay_steps", "train.log_every", "train.cpu_threads",
              "train.checkpoint_every", "train.checkpoints_total_limit", "train.snapshot_steps",
              "train.sample_every", "train.sample_n", "train.sample_steps", "train.sample_seed",
              "data.num_workers", "data.encode_batch_size", "cache_dir", "run_dir",
              "wandb.", "eval.", "segnet.", "sr.test", "sr.max_test")
# Keys declared in a config after run folders were written without them (the value the code used
# while they were absent), and dead keys dropped from configs (the value stored configs hold).
# Configs are compared in their earlier form, so a folder written before still resumes and a
# finished downstream evaluation is still found (downstream/finetune.py hashes this form).
DECLARED_LATER = {"scratch_resolution": 64, "wandb": None}
DROPPED = {"autoencoder.max_steps": 0}  # fitted first stages (kl_small) still declare theirs


def earlier_form(d: dict) -> dict:
    """A resolved config as the code before DECLARED_LATER / DROPPED wrote it (a copy)."""
    import copy

    d = copy.deepcopy(d)
    for key, value in DECLARED_LATER.items():
        *parents, leaf = key.split(".")
        node = _node(d, parents)
        if isinstance(node, dict) and leaf in node and node[leaf] == value:
            del node[leaf]
    for key, value in DROPPED.items():
        *parents, leaf = key.split(".")
        node = _node(d, parents)
        if isinstance(node, dict) and parents and leaf not in node:
            node[leaf] = value
    return d


def _node(d, parents: list[str]):
    for k in parents:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_differ(key: str) -> bool:
    return any(key.startswith(m) if m.endswith(".") else key == m for m in MAY_DIFFER)


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs and may not (MAY_DIFFER)."""
    a, b = _flat(earlier_form(old)), _flat(earlier_form(new))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>") and not _may_differ(k))


def check_config(run_dir, cfg, write: bool) -> None:
    """Refuse (UsageError, exit 2) a run_dir that holds a run of another config; then (if `write`)
    store this config as config.yaml. The engine writes it after the first trained step, so a run
    that failed before one (a bad value, a crash while preparing) leaves no config to refuse."""
    from omegaconf import OmegaConf

    from rsprune.errors import UsageError

    new = OmegaConf.to_container(cfg, resolve=True)
    old = stored_config(run_dir)
    if old is not None:
        bad = config_changes(old, new)
        if bad:
            fa, fb = _flat(old), _flat(new)
            shown = "; ".join(f"{k}: {fa.get(k, '<absent>')} -> {fb.get(k, '<absent>')}" for k in bad[:6])
            raise UsageError(f"{run_dir} holds a run with another config ({shown}{' ...' if len(bad) > 6 else ''}); "
                             "rerun with its values or choose another run_dir")
    if write:
        write_config(run_dir, cfg)


def write_config(run_dir, cfg) -> None:
    from omegaconf import OmegaConf

    from rsprune.cache import write_text

    write_text(Path(run_dir) / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def stored_config(run_dir) -> dict | None:
    """The run folder's config.yaml as a dict, None if absent. One that does not read as a mapping
    (malformed YAML, a list, an empty file) is a UsageError where something was trained, else
    warned about and taken as absent (the next trained step rewrites it)."""
    from omegaconf import OmegaConf

    from rsprune.errors import UsageError, warn

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        why = None if isinstance(old, dict) and old else "empty" if not old else f"a {type(old).__name__}, not a mapping"
    except Exception as e:  # YAML and OmegaConf errors of many types, undecodable bytes, I/O
        why = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    if why is None:
        return old
    if any(step_folders(Path(run_dir) / kind) for kind in (CHECKPOINTS, SNAPSHOTS)):
        raise UsageError(f"{path} is not a readable run config ({why}) but the folder holds trained steps; "
                         "restore the file, or choose another run_dir")
    warn(f"{path} is not a readable run config ({why}); nothing was trained here, so it is replaced")
    return None
