"""Train a latent diffusion backbone on a pruned subset: accelerate launch train/main.py [key=value ...]

Examples:
  accelerate launch train/main.py +experiment=cpu_small data.subset=RUN_DIR/kept.txt run_dir=OUT
  python train/main.py +experiment=cpu_small data.subset=full train.max_steps=100 run_dir=OUT
Rerun the same command to resume from the latest checkpoint in run_dir.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rsprune import layout
from rsprune.cache import write_json, write_text
from rsprune.split import record as record_split
from rsprune.cli import UsageError, main
from train import checkpoint as ckpt
from train import data as tdata
from train import setup
from train.hooks import FDHook, MetricsLog, save_sample_grid

log = logging.getLogger("train")


def run(cfg) -> dict:
    """Train until train.max_steps; returns a summary (step, loss, images/s, checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState

    _check(cfg)
    # A second run() in one process (tests, notebooks) may change mixed precision: forget the old
    # settings (the process group, if any, is kept).
    AcceleratorState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=int(cfg.train.grad_accum),
                      mixed_precision=str(cfg.train.mixed_precision))
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")  # no-op if the caller configured logging
    for name in ("train", "rsprune"):  # progress from the main process only; warnings from all
        logging.getLogger(name).setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
    for name in ("accelerate", "diffusers"):  # their per-file save/load lines drown the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.train.get("cpu_threads"):  # on a shared CPU, fewer threads than cores avoids spin-wait contention
        torch.set_num_threads(int(cfg.train.cpu_threads))
    if torch.cuda.is_available() and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    run_dir = Path(str(cfg.run_dir))
    first_stage, latents, hold_paths = _prepare_data(cfg, acc, run_dir)
    probes = _build_probes(cfg, first_stage) if acc.is_main_process else None
    n = len(latents)
    # Seeded here, after data preparation (whose DataLoader draws from the global RNG only when
    # the cache is cold): the initial weights are the same on every process and every run.
    set_seed(int(cfg.seed))
    unet = setup.build_unet(cfg.unet, first_stage.latent_channels, latents.shape[-1])
    noise_scheduler = setup.build_noise_scheduler(cfg.scheduler)
    ema = setup.build_ema(unet, cfg.train.ema)
    optimizer = setup.build_optimizer(unet.parameters(), cfg.optim)
    lr_scheduler = setup.build_lr_scheduler(optimizer, cfg.optim)
    unet, optimizer = acc.prepare(unet, optimizer)
    ema.to(acc.device)
    acc.register_for_checkpointing(ema, lr_scheduler)

    if acc.is_main_process:
        ckpt.clean_partial(run_dir)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(run_dir / layout.SPLIT, record_split(cfg.data))  # the test split this run is scored on
    acc.wait_for_everyone()
    step = ckpt.resume(acc, run_dir)
    if step:
        log.info("resumed from step %d", step)
    metrics = MetricsLog(run_dir, cfg, step) if acc.is_main_process else None
    if metrics is not None and step == 0:
        metrics.write({"step": 0, "params": setup.count_params(unet), "train_images": n,
                       "first_stage": first_stage.describe(), "latent_scale": first_stage.scale,
                       "latent_shift": first_stage.shift,
                       **_psnr(first_stage, hold_paths, int(cfg.data.resolution))})
    fd = FDHook(cfg, lambda: tdata.load_images(hold_paths, int(cfg.data.resolution)))
    summary = _loop(cfg, acc, unet, ema, optimizer, lr_scheduler, noise_scheduler, first_stage, latents,
                    step, metrics, fd, run_dir, probes)
    if metrics is not None:
        metrics.close()
    acc.end_training()
    return summary


def _check(cfg) -> None:
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every"):
        if int(t[key]) < (0 if key == "max_steps" else 1):
            raise UsageError(f"train.{key}={t[key]} must be positive")
    if int(cfg.data.resolution) % 8:
        raise UsageError(f"data.resolution={cfg.data.resolution} must be a multiple of 8")
    setup.build_noise_scheduler(cfg.scheduler)  # refuses epsilon at alpha_bar ~ 0 before any data is encoded


def _prepare_data(cfg, acc, run_dir: Path):
    """First stage (scaled by the corpus's latent std) and the cached latents, computed by the main process first."""
    from rsprune.autoencoders import build_first_stage

    res = int(cfg.data.resolution)
    train_paths, hold_paths = tdata.resolve_subset(cfg.data, int(cfg.seed))
    _check_batch(cfg, len(train_paths), acc.num_processes)
    # One process per machine encodes (a cache on a shared filesystem is written once, atomically).
    with acc.local_main_process_first():
        fit_paths = _fit_sample(train_paths, int(cfg.autoencoder.get("fit_images", 2048)), int(cfg.seed))
        fs = build_first_stage(cfg.autoencoder, lambda: tdata.load_images(fit_paths, res),
                               cfg.cache_dir, key_parts=(fit_paths, res)).to(acc.device)
        latents, meta = tdata.cached_latents(fs, train_paths, res, cfg.cache_dir, int(cfg.data.encode_batch_size),
                                             int(cfg.data.num_workers), acc.is_local_main_process)
        norm = tdata.corpus_scale(fs, cfg.data, cfg.cache_dir, int(cfg.data.encode_batch_size),
                                  int(cfg.data.num_workers), acc.is_local_main_process)
    if meta["unreadable"]:
        log.warning("latent cache: %d unreadable images skipped; first: %s", meta["unreadable"],
                    ", ".join(meta["unreadable_first"][:3]))
    _check_batch(cfg, len(latents), acc.num_processes)
    fs.scale, fs.shift, fs.scale_from = norm["scale"], norm["shift"], norm["scale_from"]
    log.info("%d training latents %s, std %.3f (corpus scale: std %.3f over %d images); %d held-out images",
             len(latents), meta["shape"], meta["std"], 1 / fs.scale, norm["scale_from"]["n"], len(hold_paths))
    return fs, latents, hold_paths


def _build_probes(cfg, first_stage):
    """train.probes on a fixed sample of `eval.heldout_n` test-split images (main process)."""
    from train.probes import Probes

    paths = tdata.seeded_sample(tdata.test_paths(cfg.data), int(cfg.eval.heldout_n))
    z, images = tdata.probe_set(first_stage, paths, int(cfg.data.resolution), cfg.cache_dir,
                                int(cfg.data.encode_batch_size), int(cfg.data.num_workers))
    return Probes(setup.build_noise_scheduler(cfg.scheduler), first_stage, z, images,
                  int(cfg.eval.heldout_timesteps), int(cfg.eval.heldout_seed), float(cfg.eval.sample_drift))


def _fit_sample(paths: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of at most n training images to fit kl_small on (bounded memory)."""
    if len(paths) <= n:
        return paths
    import numpy as np

    return [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), n, replace=False))]


def _check_batch(cfg, n: int, world: int) -> None:
    need = int(cfg.train.batch_size) * world
    if need > n:
        raise UsageError(f"train.batch_size={cfg.train.batch_size} x {world} processes = {need} "
                         f"exceeds the {n} training images; lower train.batch_size")


def _psnr(first_stage, hold_paths, res: int) -> dict:
    """First-stage reconstruction PSNR on the held-out images (logged once, at step 0)."""
    from rsprune.autoencoders import reconstruction_psnr

    r = reconstruction_psnr(first_stage, tdata.load_images(hold_paths, res))
    log.info("first stage PSNR on %d held-out images at %d px: %.2f dB mean, %.2f worst",
             r["n"], res, r["psnr_mean"], r["psnr_min"])
    return {f"first_stage_{k}": v for k, v in r.items()}


def _loop(cfg, acc, unet, ema, optimizer, lr_scheduler, noise_scheduler, first_stage, latents, step, metrics,
          fd, run_dir, probes=None) -> dict:
    """Optimizer steps from `step` to train.max_steps, with logging, samples, FD and checkpoints."""
    from tqdm import tqdm

    t = cfg.train
    max_steps, accum, bs = int(t.max_steps), int(t.grad_accum), int(t.batch_size)
    seed, rank, world = int(cfg.seed), acc.process_index, acc.num_processes
    scale, shift = first_stage.scale, first_stage.shift
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=not acc.is_main_process, unit="step")
    loss_sum, loss_n, t_log, hook_s, last_loss = 0.0, 0, time.perf_counter(), 0.0, float("nan")
    steps_timed, time_timed, start_step = 0, 0.0, step
    unet.train()
    while step < max_steps:
        for k in range(accum):
            micro = step * accum + k
            idx = tdata.batch_indices(len(latents), micro, bs, rank, world, seed)
            x0 = (torch.from_numpy(latents[idx].astype("float32")).to(acc.device) - shift) * scale
            gen = torch.Generator().manual_seed(seed * 1_000_003 + micro * world + rank)
            with acc.accumulate(unet):
                loss = setup.diffusion_loss(unet, noise_scheduler, x0, gen)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(unet.parameters(), float(t.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float().item()
            loss_n += 1
        lr_scheduler.step()
        ema.step(unet.parameters())
        step += 1
        bar.update(1)
        if step % int(t.log_every) == 0 or step == max_steps:
            last_loss = _gather_mean(acc, loss_sum / max(loss_n, 1))
            dt = time.perf_counter() - t_log - hook_s
            ips = (step - start_step) * bs * world * accum / max(dt, 1e-9)
            steps_timed, time_timed = steps_timed + step - start_step, time_timed + dt
            if metrics is not None:
                metrics.write({"step": step, "loss": last_loss, "lr": lr_scheduler.get_last_lr()[0],
                               "images_per_s": ips, "epoch": step * bs * world * accum / len(latents)})
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}")
            loss_sum, loss_n, t_log, hook_s, start_step = 0.0, 0, time.perf_counter(), 0.0, step
        h0 = time.perf_counter()
        _hooks(cfg, acc, unet, ema, noise_scheduler, first_stage, step, metrics, fd, run_dir, max_steps, probes)
        hook_s += time.perf_counter() - h0
    bar.close()
    last = ckpt.list_checkpoints(run_dir)
    return {"run_dir": str(run_dir), "step": step, "loss": last_loss,
            "images_per_s": steps_timed * bs * world * accum / time_timed if time_timed else float("nan"),
            "checkpoint": str(last[-1][1]) if last else None}


def _gather_mean(acc, value: float) -> float:
    v = torch.tensor([value], device=acc.device)
    return float(acc.gather(v).mean())


def _hooks(cfg, acc, unet, ema, noise_scheduler, first_stage, step, metrics, fd, run_dir, max_steps,
           probes=None) -> None:
    """Samples and FD (main process, EMA weights), then checkpoints (every process)."""
    t = cfg.train
    sample_due = int(t.sample_every) > 0 and (step % int(t.sample_every) == 0 or step == max_steps)
    ckpt_due = step % int(t.checkpoint_every) == 0 or step == max_steps
    if (sample_due or fd.due(step) or ckpt_due) and acc.is_main_process:
        model = acc.unwrap_model(unet)
        model.eval()
        with ckpt.ema_weights(model, ema):
            if sample_due:
                _, z, imgs = save_sample_grid(run_dir, step, model, noise_scheduler, first_stage, cfg)
                metrics.write({"step": step, **probes.samples(step, z, imgs)})
            if ckpt_due:
                metrics.write({"step": step, **probes.heldout(step, model)})
            if fd.due(step):
                metrics.write({"step": step, **fd(model, noise_scheduler, first_stage)})
        model.train()
    if ckpt_due:
        ckpt.save_checkpoint(acc, run_dir, step, unet, ema, noise_scheduler, first_stage.describe(),
                             int(t.checkpoints_total_limit), {"max_steps": max_steps})


if __name__ == "__main__":
    main("train", run, __doc__)
