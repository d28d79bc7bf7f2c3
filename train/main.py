"""Train a latent diffusion backbone on a pruned subset: python train/main.py [key=value ...]

Examples:
  python train/main.py +experiment=cpu_small data.subset=RUN_DIR/kept.txt run_dir=OUT      # CPU, one process
  accelerate launch --num_processes 1 train/main.py +experiment=cpu_small data.subset=full run_dir=OUT
  accelerate launch train/main.py +experiment=paper_gpu ...   # GPUs, after `accelerate config`
Rerun the same command to resume from the latest checkpoint in run_dir.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rsprune import layout, runlock
from rsprune.cache import check_writable, write_json
from rsprune.cli import UsageError, main
from rsprune.fingerprint import fingerprints
from rsprune.layout import check_config
from rsprune.markers import mark_cache, mark_run
from rsprune.split import record as split_record
from train import data as tdata
from train import engine, setup
from train.generate import sample_latents
from train.hooks import FDHook
from train.validate import check_train

log = logging.getLogger("train")


def run(cfg, probes: engine.Probes | None = None) -> dict:
    """Train until train.max_steps; returns a summary (step, loss, images/s, checkpoint).

    `probes` (train/probes.py's, or any object with heldout(step, unet_ema) and samples(step,
    latents)) adds measurements to the metrics records of snapshot, checkpoint and sample steps.
    """
    precheck(cfg)
    engine.check_sizes(cfg)
    setup.build_noise_scheduler(cfg.scheduler)  # refuses epsilon at alpha_bar ~ 0 before any data is encoded
    cfg, subset = _with_subset_hash(cfg)
    acc = engine.accelerator(cfg)
    run_dir = Path(str(cfg.run_dir))
    with runlock.hold(run_dir, acc):  # one run per folder: a second one exits 2 naming this pid
        return _train(cfg, acc, run_dir, subset, probes)


def precheck(cfg) -> None:
    """What needs no data: every value, and that run_dir and cache_dir can be written (the command
    line runs it before the default split is drawn, run() again for callers from Python)."""
    check_train(cfg)
    check_writable(str(cfg.run_dir), "run_dir")  # not after the latents are encoded
    check_writable(str(cfg.cache_dir), "cache_dir")


def _train(cfg, acc, run_dir: Path, subset, probes) -> dict:
    from accelerate.utils import set_seed

    check_config(run_dir, cfg, write=False)  # refuse another run's folder before encoding anything
    if acc.is_main_process:  # the data sets this run was given, by size and list hash (rsprune.split)
        write_json(run_dir / layout.SPLIT, split_record(cfg.data))
        mark_run(run_dir)  # sample grids never become corpus images of a later walk
        mark_cache(cfg.cache_dir)
    first_stage, latents, hold_paths = _prepare_data(cfg, acc, run_dir)
    if probes is None:  # protocol's held-out loss and sample statistics on the test split (main process)
        probes = _build_probes(cfg, first_stage, run_dir) if acc.is_main_process else engine.NoProbes()
    # Seeded here, after data preparation (whose DataLoader draws from the global RNG only when
    # the cache is cold): the initial weights are the same on every process and every run.
    set_seed(int(cfg.seed))
    unet = setup.build_unet(cfg.unet, first_stage.latent_channels, latents.shape[-1])
    noise_scheduler = setup.build_noise_scheduler(cfg.scheduler)
    res, t = int(cfg.data.resolution), cfg.train
    job = engine.Job(
        unet, noise_scheduler, first_stage, len(latents), batch=_latent_batches(latents, first_stage),
        first_record=lambda: {"first_stage": first_stage.describe(), "subset": subset,
                              "latent_scale": first_stage.scale, "latent_shift": first_stage.shift,
                              **_psnr(first_stage, hold_paths, res)},
        sample=lambda model: sample_latents(model, noise_scheduler, int(t.sample_n), int(t.sample_seed),
                                            int(t.sample_steps), "ddim"),
        ema_hooks=[FDHook(cfg, lambda: tdata.load_images(hold_paths, res), noise_scheduler, first_stage)],
        probes=probes)
    summary, _ = engine.fit(acc, cfg, job, run_dir)
    acc.end_training()
    return summary


def _with_subset_hash(cfg) -> tuple:
    """cfg with data.subset_hash: the kept list's and its prune run's sha256 (None for the full corpus),
    recorded in config.yaml, so a rerun on a re-pruned subset is refused instead of mixed in."""
    from omegaconf import open_dict

    from rsprune.manifest import kept_file, prune_run_hash

    cfg = cfg.copy()
    spec = str(cfg.data.subset)
    info = None
    if spec != "full":
        if not kept_file(spec).is_file():
            raise UsageError(f"subset file {kept_file(spec)} does not exist (data.subset=RUN_DIR/kept.txt | RUN_DIR | full)")
        info = prune_run_hash(spec)
    with open_dict(cfg):
        cfg.data.subset_hash = info
    return cfg, info


def _latent_batches(latents, first_stage):
    """batch(indices, generator) for the engine: cached latents, shifted and scaled to unit std."""
    scale, shift = first_stage.scale, first_stage.shift

    def batch(idx, gen):
        return (torch.from_numpy(latents[idx].astype("float32")) - shift) * scale, None
    return batch


def _prepare_data(cfg, acc, run_dir: Path):
    """First stage (scaled by the corpus's latent std) and the cached latents, computed by the main process first."""
    from train.first_stage import build_first_stage

    res = int(cfg.data.resolution)
    train_paths, hold_paths = tdata.resolve_subset(cfg.data, int(cfg.seed), cfg.cache_dir)
    engine.check_sizes(cfg, len(train_paths), acc.num_processes)
    # One process per machine encodes (a cache on a shared filesystem is written once, atomically).
    with acc.local_main_process_first():
        # kl_small fits on a bounded seeded sample of the subset (memory)
        fit_paths = tdata.seeded_sample(train_paths, int(cfg.autoencoder.get("fit_images", 2048)), int(cfg.seed))
        fit_key = (fit_paths, fingerprints(fit_paths, tdata.memo_dir(cfg.cache_dir)), res)  # by content too
        fs = build_first_stage(cfg.autoencoder, lambda: tdata.load_images(fit_paths, res),
                               cfg.cache_dir, key_parts=fit_key).to(acc.device)
        latents, meta = tdata.cached_latents(fs, train_paths, res, cfg.cache_dir, int(cfg.data.encode_batch_size),
                                             int(cfg.data.num_workers), acc.is_local_main_process)
        norm = tdata.corpus_scale(fs, cfg.data, cfg.cache_dir, int(cfg.data.encode_batch_size),
                                  int(cfg.data.num_workers), acc.is_local_main_process)
    if meta["unreadable"]:
        log.warning("latent cache: %d unreadable images skipped; first: %s", meta["unreadable"],
                    ", ".join(meta["unreadable_first"][:3]))
    engine.check_sizes(cfg, len(latents), acc.num_processes)
    fs.scale, fs.shift, fs.scale_from = norm["scale"], norm["shift"], norm["scale_from"]
    log.info("%d training latents %s, std %.3f (corpus scale: std %.3f over %d images); %d held-out images",
             len(latents), meta["shape"], meta["std"], 1 / fs.scale, norm["scale_from"]["n"], len(hold_paths))
    return fs, latents, hold_paths


def _build_probes(cfg, first_stage, run_dir: Path):
    """train.probes on `eval.heldout_n` test-split images (null / all: the whole split; else a
    fixed sample), writing per-image losses under run_dir (main process)."""
    from rsprune.split import describe
    from train.probes import Probes

    test = tdata.test_paths(cfg.data)
    paths = tdata.seeded_sample(test, tdata.sample_size(cfg.eval.get("heldout_n"), "eval.heldout_n"))
    z, images, kept = tdata.probe_set(first_stage, paths, int(cfg.data.resolution), cfg.cache_dir,
                                      int(cfg.data.encode_batch_size), int(cfg.data.num_workers))
    return Probes(setup.build_noise_scheduler(cfg.scheduler), first_stage, z, images,
                  int(cfg.eval.heldout_timesteps), int(cfg.eval.heldout_seed), float(cfg.eval.sample_drift),
                  run_dir=run_dir, paths=kept, root=str(cfg.data.get("root") or "") or None,
                  test_sha256=describe(cfg.data.test)["sha256"] if isinstance(cfg.data.test, str) else None)


def _psnr(first_stage, hold_paths, res: int) -> dict:
    """First-stage reconstruction PSNR on the held-out images (logged once, at step 0)."""
    from rsprune.autoencoders import reconstruction_psnr

    r = reconstruction_psnr(first_stage, tdata.load_images(hold_paths, res))
    log.info("first stage PSNR on %d held-out images at %d px: %.2f dB mean, %.2f worst",
             r["n"], res, r["psnr_mean"], r["psnr_min"])
    return {f"first_stage_{k}": v for k, v in r.items()}


if __name__ == "__main__":
    main("train", run, __doc__, precheck)
