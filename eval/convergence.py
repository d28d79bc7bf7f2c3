"""Convergence curves: every run scored at every saved step against the ONE test split.

    python eval/convergence.py runs=[outputs/train/full-s0,outputs/train/full-s1] [arm_key=data.subset]
    python eval/convergence.py 'runs={full:[RUN,RUN],rsprune:[RUN,RUN]}'

For every run and every step `train.generate.list_snapshots` returns (light EMA snapshots and
complete checkpoints; `score_steps=[...]` picks some), it generates `n_samples` images from the
EMA weights with a fixed seed and sampler, and scores them in the feature space `feature`
(rsprune/features.py; the test images are first brought to the generated side):
- FD and KID (+ std over subsets of half the smaller set) against the whole test split;
- with `fid=true`, Inception FID (rsprune/features.py) of the same samples, whole and
  class-balanced: the 64 px images are resized to 299 px by PIL's antialiased bicubic, as the
  test images are;
- the same against a class-balanced resample of the test split (classes = folders; every
  class drawn down to the smallest class's count, seeded), so a model is not rewarded for the
  test split's class mix;
- the memorisation rate (eval/memorisation.py) against the run's own training images;
- the held-out denoising loss the training engine logged at that step (`heldout_loss` in
  metrics.jsonl; "-" where absent) and, where the run kept per-image losses (RUN/heldout/), the
  natural-mix, class-balanced and worst-class held-out loss recomputed from them (eval/heldout.py).

The test split is `test=DIR|LIST` or, by default, each run's `data.test` (config.yaml); its
file-list hash (rsprune.split.describe) is stored in every row, and runs scored against
different test splits, sample counts, samplers, sampler steps, seeds, features or sides are
refused (exit 2): their numbers do not compare. A run whose split.json records another test
split than the one scored against is refused too.

Runs are grouped into arms (a `runs` mapping arm -> [run dirs], or `arm_key`: a config.yaml key
such as data.subset; else each run is its own arm); the report gives each arm's mean, std and
number of runs per step, and paired statistics between arms, runs paired by training seed
(eval/convergence_report.py, eval/paired.py). Writes `<run>/convergence.csv` (one row per
step, written after every step: rerunning resumes and skips steps scored under the same
settings), `<results_dir>/convergence.md|png` and `<results_dir>/samples/<run>.png`.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rsprune import layout
from rsprune.cache import atomic_path, read_json, write_json
from rsprune.cli import UsageError, main
from rsprune.device import resolve as resolve_device
from rsprune.features import build_extractor, extract_features, metric_label, reference_stats, warn
from rsprune.frechet import check_count, fd_kid
from rsprune.sheets import sample_sheet

from eval import convergence_report as report
from eval.heldout import check_pairing, per_image_losses, run_seed, with_heldout_loss
from eval.fid import encoder_overrides
from eval.memorisation import memorisation_rate, threshold

CSV = "convergence.csv"
YARDSTICK = "yardstick.json"  # real training images scored like samples (write_yardstick)
SETTINGS = ["metric", "side", "n_fake", "sampler", "steps", "seed", "test_sha256"]  # equal in compared rows
COLUMNS = ["step", "fd", "kid", "kid_std", "fd_balanced", "kid_balanced", "kid_balanced_std", "memorisation",
           "fid", "fid_balanced", "n_test", "n_balanced", "n_train", *SETTINGS]
FID_COLUMNS = ["fid", "fid_balanced"]  # Inception FID beside the FD of `feature` (fid=true); absent in older CSVs


def run_groups(cfg) -> dict[str, list[Path]]:
    """arm -> run folders, each checked to exist and to hold a snapshot or a convergence.csv."""
    from train.generate import list_snapshots

    runs = cfg.get("runs")
    if OmegaConf.is_dict(runs):
        groups = {str(a): [Path(str(d)) for d in ds] for a, ds in runs.items()}
    else:
        # glob patterns expand (sorted); a pattern matching nothing stays, to be reported as absent
        dirs = [Path(m) for r in (runs or []) for m in (sorted(glob.glob(str(r))) or [str(r)])]
        groups = {}
        for d in dirs:
            groups.setdefault(arm_of(d, cfg.get("arm_key")), []).append(d)
    if not any(groups.values()):
        raise UsageError("no run folders given: runs=[RUN_DIR,...] or runs={arm: [RUN_DIR,...]}")
    for d in (d for ds in groups.values() for d in ds):
        if not d.is_dir():
            raise UsageError(f"run folder {d} does not exist")
        if not list_snapshots(d) and not (d / CSV).is_file():
            raise UsageError(f"no snapshot or checkpoint in {d} (and no {CSV} to report)")
    return groups


def arm_of(run_dir: Path, key) -> str:
    """The arm of a run: the value of config key `key` in its config.yaml, its folder name (no key),
    or with key `folder` its folder name less a `-s<seed>` suffix (full-s0, full-s1 -> full)."""
    if not key:
        return run_dir.name
    if str(key) == "folder":
        return re.sub(r"-s\d+$", "", run_dir.name)
    conf = run_dir / layout.CONFIG
    value = OmegaConf.select(OmegaConf.load(conf), str(key)) if conf.is_file() else None
    if value is None:
        raise UsageError(f"arm_key={key}: not set in {conf}")
    return Path(str(value)).name if "/" in str(value) else str(value)


def run_names(runs: list[Path]) -> list[str]:
    """Short unique labels: the folder name, or parent/name where names clash."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def run_config(run_dir: Path):
    conf = run_dir / layout.CONFIG
    if not conf.is_file():
        raise UsageError(f"{conf} not found (written by train/main.py)")
    return OmegaConf.load(conf)


def test_split(cfg, run_dir: Path) -> dict:
    """{entry, paths, sha256} of the test split a run is scored against, checked against the
    test split the run recorded (split.json) when it trained."""
    from rsprune.split import describe, paths

    entry = cfg.get("test") or run_config(run_dir).data.get("test")
    if not entry:
        raise UsageError(f"no test split: {run_dir / layout.CONFIG} has no data.test; give test=DIR|LIST")
    desc = describe(str(entry))
    rec = run_dir / layout.SPLIT
    if rec.is_file():
        tests = read_json(rec).get("test") or []
        tests = [tests] if isinstance(tests, dict) else tests
        if tests and desc["sha256"] not in {t.get("sha256") for t in tests}:
            raise UsageError(f"{run_dir} was trained beside another test split than {entry} ("
                             f"{tests[0].get('sha256', '?')[:12]} vs {desc['sha256'][:12]}); its scores would not compare")
    return {"entry": str(entry), "paths": paths(str(entry)), "sha256": desc["sha256"]}


def training_paths(run_dir: Path) -> list[str]:
    """The images a run trained on, from its config.yaml (data.subset over data.corpus)."""
    from train.data import corpus_paths, read_subset

    data = run_config(run_dir).data
    return corpus_paths(data) if str(data.subset) == "full" else read_subset(str(data.subset))


def balanced_index(paths: list[str], readable: np.ndarray, seed: int) -> np.ndarray:
    """Rows (into the readable features) of a class-balanced resample: every class folder drawn
    down to the smallest class's count without replacement, by a seeded permutation."""
    labels = np.array([str(Path(p).parent) for p in sorted(paths)])[readable]
    classes, counts = np.unique(labels, return_counts=True)
    m = int(counts.min())
    rng = np.random.default_rng(int(seed))
    rows = [rng.permutation(np.flatnonzero(labels == c))[:m] for c in classes]
    return np.sort(np.concatenate(rows))


def read_rows(run_dir: Path) -> pd.DataFrame:
    path = run_dir / CSV
    rows = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)
    for c in FID_COLUMNS:  # CSVs scored before FID was added: their FD rows stand, FID is scored on top
        if c not in rows.columns:
            rows[c] = np.nan
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:  # a CSV of the old protocol (per-run holdout): its numbers compare with nothing here
        raise UsageError(f"{path} lacks {', '.join(missing)} (scored under the old protocol); delete it to rescore")
    return rows[COLUMNS]


def settings(cfg, metric: str, side: int, test_sha: str) -> dict:
    return {"metric": metric, "side": int(side), "n_fake": int(cfg.n_samples), "sampler": str(cfg.sampler),
            "steps": int(cfg.steps), "seed": int(cfg.seed), "test_sha256": test_sha}


def snapshot_image_size(path: Path) -> int:
    """Generated image side of a snapshot or checkpoint, from its saved configs (no weights loaded)."""
    unet = read_json(path / ("unet_ema" if (path / "unet_ema").is_dir() else "unet") / "config.json")
    return int(unet["sample_size"]) * int(read_json(path / "first_stage.json")["downscale"])


class Scorer:
    """The per-run yardsticks (test features, balanced rows, training features), built lazily:
    a report from saved CSVs needs no network and no image."""

    def __init__(self, cfg):
        self.cfg, self._extractor, self._inception, self._memo = cfg, None, None, {}
        self.fid = bool(cfg.get("fid", False)) and str(cfg.feature) != "inception"

    @property
    def extractor(self):
        if self._extractor is None:
            c = self.cfg
            self._extractor = build_extractor(c.feature, inception_weights=c.get("inception_weights"),
                                              overrides=encoder_overrides(c), device=c.get("device"))
        return self._extractor

    @property
    def inception(self):
        if self._inception is None:
            c = self.cfg
            self._inception = build_extractor("inception", inception_weights=c.get("inception_weights"),
                                              device=c.get("device"))
        return self._inception

    def stats(self, paths: list[str], side: int, extractor=None) -> dict:
        extractor = extractor or self.extractor
        key = (tuple(paths), side, extractor.name)
        if key not in self._memo:
            c = self.cfg
            self._memo[key] = reference_stats(paths, extractor, c.cache_dir, batch_size=int(c.batch_size),
                                              num_workers=int(c.num_workers), pre_size=side)
        return self._memo[key]

    def test(self, split: dict, side: int) -> dict:
        ref = self.stats(split["paths"], side)
        if ref["n_unreadable"]:
            warn(f"test split: {ref['n_unreadable']} unreadable image(s) skipped")
        check_count(ref["n"], f"test split {split['entry']}", int(self.cfg.warn_below))
        out = ref | {"balanced": balanced_index(split["paths"], ref["readable"], int(self.cfg.seed))}
        if self.fid:  # the same images decoded the same way: the same readable rows, the same resample
            out["inception"] = self.stats(split["paths"], side, self.inception)["features"]
        return out

    def score(self, fake: np.ndarray, test: dict, train: dict | None) -> dict:
        ff, _ = extract_features(fake, self.extractor, int(self.cfg.batch_size))
        fi = extract_features(fake, self.inception, int(self.cfg.batch_size))[0] if self.fid else None
        return self.score_features(ff, test, train, fi)

    def fid_row(self, fi: np.ndarray | None, test: dict) -> dict:
        """FID of Inception features `fi` against the whole and the class-balanced test split."""
        if fi is None:
            return {c: None for c in FID_COLUMNS}
        whole, bal = (fd_kid(t, fi, kid=False)["fd"] for t in (test["inception"], test["inception"][test["balanced"]]))
        return {"fid": whole, "fid_balanced": bal}

    def score_features(self, ff: np.ndarray, test: dict, train: dict | None, fi: np.ndarray | None = None) -> dict:
        """The CSV row's metrics of features `ff` (samples, or real images for the yardstick)."""
        c = self.cfg
        kw = dict(kid=bool(c.kid), kid_subsets=int(c.kid_subsets), kid_subset_size=int(c.kid_subset_size),
                  seed=int(c.seed))
        whole = fd_kid(test["features"], ff, **kw)
        bal = fd_kid(test["features"][test["balanced"]], ff, **kw)
        row = {"fd": whole["fd"], "kid": whole["kid"], "kid_std": whole["kid_std"], "fd_balanced": bal["fd"],
               "kid_balanced": bal["kid"], "kid_balanced_std": bal["kid_std"], "n_test": test["n"],
               "n_balanced": len(test["balanced"]), "memorisation": None, "n_train": None, **self.fid_row(fi, test)}
        if train is not None:
            row |= {"memorisation": memorisation_rate(train["features"], ff, train["q"]), "n_train": train["n"]}
        return row

    def train(self, run_dir: Path, test: dict, side: int) -> dict | None:
        if not self.cfg.memorisation:
            return None
        paths = sorted(training_paths(run_dir))
        ref = self.stats(paths, side)
        q = threshold(ref["features"], test["features"], float(self.cfg.memorisation_percentile))
        return {"features": ref["features"], "q": q, "n": ref["n"], "paths": np.array(paths)[ref["readable"]]}


def wanted_steps(cfg, snaps: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    if cfg.get("score_steps") is None:
        return snaps
    want = {int(s) for s in cfg.score_steps}
    return [(s, p) for s, p in snaps if s in want]


def score_run(cfg, run_dir: Path, scorer: Scorer, results_dir: Path, name: str) -> pd.DataFrame:
    """Score every unscored step of one run under the current settings; returns all its rows."""
    from train.generate import generate, list_snapshots, load_backbone

    snaps, rows = list_snapshots(run_dir), read_rows(run_dir)
    todo = wanted_steps(cfg, snaps)
    if not todo:  # nothing saved any more: report what the CSV holds
        return rows
    say(f"{name}: {len(todo)} step(s) to score or reuse: {', '.join(str(s) for s, _ in todo)}")
    split, side = test_split(cfg, run_dir), snapshot_image_size(todo[-1][1])
    now = settings(cfg, metric_label(str(cfg.feature)), side, split["sha256"])
    same = (rows[SETTINGS].astype(str) == pd.Series(now).astype(str)).all(axis=1)
    if scorer.fid:  # a step scored before FID was asked for is sampled again (same seed: the same images)
        same &= rows["fid"].notna()
    done = set(rows.loc[same, "step"].astype(int))
    from train.checkpoint import load_errors

    test = train = None
    bad: set[int] = set()
    for step, _ in todo:
        if step in done:
            continue
        if test is None:
            say(f"{name}: features of the test split ({len(split['paths'])} images) and of the run's training "
                "images, cached after the first run")
            test = scorer.test(split, side)
            train = scorer.train(run_dir, test, side)
        say(f"{name} step {step}: sampling {int(cfg.n_samples)} images ({cfg.sampler}, {int(cfg.steps)} steps)")
        try:
            loaded = load_backbone(run_dir, step=step, ema=True, device=resolve_device(cfg.get("device")))
        except load_errors() as e:  # one damaged snapshot costs its row, not the steps scored
            warn(f"{name} step {step}: snapshot does not load ({' '.join(str(e).split())[:160]}); skipped")
            bad.add(step)
            continue
        fake = generate(loaded, int(cfg.n_samples), seed=int(cfg.seed), steps=int(cfg.steps),
                        sampler=str(cfg.sampler), batch_size=int(cfg.batch_size), progress=True)
        row = {"step": step, **scorer.score(fake, test, train), **now}
        rows = pd.concat([rows[rows["step"] != step], pd.DataFrame([row])[COLUMNS]]) if len(rows) else \
            pd.DataFrame([row])[COLUMNS]
        rows = rows.sort_values("step", kind="stable").reset_index(drop=True)
        with atomic_path(run_dir / CSV) as tmp:  # after every step: a killed run resumes here
            rows.to_csv(tmp, index=False)
        print(f"{name} step {step}: fd={row['fd']:.6g} fd_balanced={row['fd_balanced']:.6g}"
              + (f" fid={row['fid']:.6g}" if row["fid"] is not None else "")
              + (f" memorisation={row['memorisation']:.3f}" if row["memorisation"] is not None else ""))
    good = [s for s, _ in todo if s not in bad]
    if int(cfg.sheet_n) > 0 and good:
        write_sheet(cfg, run_dir, good[-1], side, split["paths"], results_dir, name)
    stale = (run_dir / YARDSTICK).is_file() and scorer.fid and read_json(run_dir / YARDSTICK).get("fid") is None
    if cfg.memorisation and (stale or not (run_dir / YARDSTICK).is_file()):  # cached features: cheap once scored
        test = test if test is not None else scorer.test(split, side)
        train = train if train is not None else scorer.train(run_dir, test, side)
        write_yardstick(cfg, run_dir, scorer, test, train, now)
    return rows


def write_yardstick(cfg, run_dir: Path, scorer: Scorer, test: dict, train: dict, now: dict) -> None:
    """`<run>/yardstick.json`: FD/KID of `n_samples` REAL training images of the run (a seeded draw)
    against the same test split, scored as samples are: the score a perfect model would approach."""
    n = min(int(cfg.n_samples), len(train["features"]))
    idx = np.random.default_rng(int(cfg.seed)).choice(len(train["features"]), n, replace=False)
    fi = None
    if scorer.fid:  # the same images' Inception features: cached by content, so once per training set
        drawn = list(train["paths"][idx])
        fi = scorer.stats(drawn, now["side"], scorer.inception)["features"][np.argsort(np.argsort(drawn))]
    row = scorer.score_features(train["features"][idx], test, None, fi)
    write_json(run_dir / YARDSTICK, {"n_real": n, **{k: row[k] for k in ("fd", "kid", "fd_balanced", "kid_balanced",
                                                                          *FID_COLUMNS)}, **now})


def write_sheet(cfg, run_dir: Path, step: int, side: int, test_paths, results_dir: Path, name: str) -> Path:
    """`sheet_n` samples of the last step (same seed and sampler) beside as many test images."""
    from train.generate import generate, load_backbone
    from train.data import load_images

    n = int(cfg.sheet_n)
    loaded = load_backbone(run_dir, step=step, ema=True, device=resolve_device(cfg.get("device")))
    fake = generate(loaded, n, seed=int(cfg.seed), steps=int(cfg.steps), sampler=str(cfg.sampler),
                    batch_size=int(cfg.batch_size))
    real = load_images(test_paths[:: max(1, len(test_paths) // n)][:n], side)  # spread over the sorted classes
    path = results_dir / "samples" / f"{name.replace('/', '_')}.png"
    sample_sheet(fake, real, path, captions=(f"generated, step {step}", "test split"))
    return path


def say(msg: str) -> None:
    print(f"[convergence] {msg}", flush=True)


def run(cfg: DictConfig) -> dict:
    """Score every run's saved steps, check they compare, then write the table and the figure."""
    groups = run_groups(cfg)
    results_dir = Path(str(cfg.results_dir))
    scorer = Scorer(cfg)
    all_runs = [d for ds in groups.values() for d in ds]
    names = dict(zip(all_runs, run_names(all_runs)))
    files = {names[d]: per_image_losses(d) for d in all_runs}
    index = check_pairing({n: ix for n, (ix, _) in files.items() if ix is not None})
    classes = index["classes"] if index else None
    per_image = {n: steps for n, (_, steps) in files.items() if steps}
    curves = {}
    for arm, dirs in groups.items():
        for d in dirs:
            rows = score_run(cfg, d, scorer, results_dir, names[d])
            curves[names[d]] = with_heldout_loss(rows, d, per_image.get(names[d]), classes).assign(
                arm=arm, run_seed=run_seed(d))
    report.check_comparable(curves, SETTINGS)
    yard = {names[d]: read_json(d / YARDSTICK) | {"arm": arm} for arm, ds in groups.items() for d in ds
            if (d / YARDSTICK).is_file()}
    return report.write(curves, cfg, results_dir, yard, per_image, classes)


section = run  # the `convergence` section of eval/tables.py


if __name__ == "__main__":
    main("eval/convergence", run, __doc__)
