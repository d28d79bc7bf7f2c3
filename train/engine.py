"""The one training loop: train/main.py and both downstream commands run their model through it.

    acc = engine.accelerator(cfg)
    job = engine.Job(unet, noise_scheduler, first_stage, n, batch=lambda idx, gen: (x0, cond))
    summary, ema_unet = engine.fit(acc, cfg, job, run_dir)

What it owns: the data order (batch k is a pure function of (seed, k): train.data.batch_indices),
gradient accumulation, clipping when gradients sync, the EMA (with warm-up), the metrics log,
sample grids, EMA snapshots, checkpoints (write-then-rename, rotation) and resume. Noise,
timesteps and any augmentation of micro-step m draw from one generator seeded by (seed, m, rank),
so a rerun of the same command continues bit-identically from the newest complete checkpoint.

The caller gives the model, the number of training items, and `batch(indices, generator) ->
(x0, condition or None)` (scaled latents; a condition is concatenated to the UNet input).
`probes` (train/probes.py) is called on the main process: `heldout(step, unet_ema)` at every
snapshot and checkpoint step and `samples(step, latents, images)` (the grid's scaled latents and
decoded uint8 images) at every sample step; what they return is merged into that step's
metrics.jsonl record.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from rsprune import runlock
from rsprune.cli import UsageError
from rsprune.layout import check_config, write_config
from train import checkpoint as ckpt
from train import setup
from train.data import batch_indices
from train.hooks import MetricsLog, save_sample_grid
from train.validate import check_engine

log = logging.getLogger("train")


class Probes(Protocol):
    def heldout(self, step: int, unet_ema) -> dict: ...

    def samples(self, step: int, latents: torch.Tensor, images: np.ndarray | None = None) -> dict: ...


class NoProbes:
    """The default: nothing measured beyond the training loss."""

    def heldout(self, step: int, unet_ema) -> dict:
        return {}

    def samples(self, step: int, latents: torch.Tensor, images: np.ndarray | None = None) -> dict:
        return {}


@dataclass
class Job:
    unet: torch.nn.Module
    noise_scheduler: Any
    first_stage: Any                 # describe() for checkpoints, decode() for sample grids
    n: int                           # training items
    batch: Callable[[np.ndarray, torch.Generator], tuple]   # (indices, generator) -> (x0, cond | None)
    first_record: Callable[[], dict] | None = None          # merged into a fresh run's step-0 record
    sample: Callable | None = None   # (unet_ema) -> scaled latents for the sample grid; None: no grids
    ema_hooks: list = field(default_factory=list)           # objects with due(step), __call__(unet_ema) -> dict
    probes: Probes = field(default_factory=NoProbes)


class Conditioned:
    """The UNet with a fixed condition concatenated to its input channels (diffusion_loss's view)."""

    def __init__(self, unet, cond: torch.Tensor):
        self.unet, self.cond = unet, cond

    def __call__(self, x, t):
        return self.unet(torch.cat([x, self.cond.to(x.dtype)], 1), t)


def accelerator(cfg):
    """A fresh Accelerator for cfg.train, with the process's logging and threads set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t = cfg.train
    # A second run in one process (tests, notebooks) may change mixed precision: forget the old
    # settings (the process group, if any, is kept).
    AcceleratorState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=int(t.get("grad_accum", 1)),
                      mixed_precision=str(t.mixed_precision))
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")  # no-op if the caller configured logging
    for name in ("train", "rsprune", "downstream"):  # progress from the main process only; warnings from all
        logging.getLogger(name).setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
    for name in ("accelerate", "diffusers"):  # their per-file save/load lines drown the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    if t.get("cpu_threads"):  # on a shared CPU, fewer threads than cores avoids spin-wait contention
        torch.set_num_threads(int(t.cpu_threads))
    if torch.cuda.is_available() and t.get("allow_tf32", True):
        torch.backends.cuda.matmul.allow_tf32 = True
    return acc


def check_sizes(cfg, n: int | None = None, world: int = 1) -> None:
    """Positive step counts; with n, a global batch that the n training items can fill."""
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if key in t and int(t[key]) < (0 if key == "max_steps" else 1):
            raise UsageError(f"train.{key}={t[key]} must be positive")
    need = int(t.batch_size) * world
    if n is not None and need > n:
        raise UsageError(f"train.batch_size={t.batch_size} x {world} processes = {need} "
                         f"exceeds the {n} training images; lower train.batch_size")


def fit(acc, cfg, job: Job, run_dir) -> tuple[dict, torch.nn.Module]:
    """Train job.unet until train.max_steps, resuming from run_dir; (summary, unwrapped EMA network).
    The run folder is locked for the call (re-entrant: train/main.py holds it already)."""
    check_engine(cfg)
    with runlock.hold(run_dir, acc):
        return _fit(acc, cfg, job, Path(run_dir))


def _fit(acc, cfg, job: Job, run_dir: Path) -> tuple[dict, torch.nn.Module]:
    check_sizes(cfg, job.n, acc.num_processes)
    check_config(run_dir, cfg, write=False)  # every process refuses alike; written after the first step
    ema = setup.build_ema(job.unet, cfg.train.ema)
    optimizer = setup.build_optimizer(job.unet.parameters(), cfg.optim)
    lr_scheduler = setup.build_lr_scheduler(optimizer, cfg.optim)  # stepped here, once per optimizer step
    if acc.is_main_process:
        ckpt.clean_partial(run_dir)
    acc.wait_for_everyone()
    job.unet.to(acc.device)
    step = ckpt.resume(run_dir, job.unet, ema, optimizer, lr_scheduler, acc.scaler)
    if step:
        log.info("resumed from step %d", step)
    unet, optimizer = acc.prepare(job.unet, optimizer)
    ema.to(acc.device)
    metrics = MetricsLog(run_dir, cfg, step) if acc.is_main_process else None
    if metrics is not None and step == 0:
        metrics.write({"step": 0, "params": setup.count_params(job.unet), "train_images": job.n,
                       **(job.first_record() if job.first_record else {})})
    loop = _Loop(acc, cfg, job, run_dir, unet, ema, optimizer, lr_scheduler, metrics)
    summary = loop.run(step)
    if metrics is not None:
        metrics.close()
    model = acc.unwrap_model(unet)
    ema.copy_to(model.parameters())
    acc.wait_for_everyone()
    return summary, model.eval().requires_grad_(False)


class _Loop:
    """The optimizer steps of one fit() call and what happens after each."""

    def __init__(self, acc, cfg, job, run_dir, unet, ema, optimizer, lr_scheduler, metrics):
        self.acc, self.cfg, self.job, self.run_dir = acc, cfg, job, run_dir
        self.unet, self.ema, self.optimizer, self.lr_scheduler, self.metrics = unet, ema, optimizer, lr_scheduler, metrics
        t = cfg.train
        self.max_steps, self.accum, self.bs = int(t.max_steps), int(t.get("grad_accum", 1)), int(t.batch_size)
        self.snapshot_steps = {int(s) for s in (t.get("snapshot_steps") or [])}

    def run(self, step: int) -> dict:
        from tqdm import tqdm

        acc, world = self.acc, self.acc.num_processes
        bar = tqdm(total=self.max_steps, initial=step, desc="train", disable=not acc.is_main_process, unit="step")
        self.loss_sum, self.loss_n, self.t_log, self.hook_s, self.from_step = 0.0, 0, time.perf_counter(), 0.0, step
        self.steps_timed, self.time_timed, self.last_loss = 0, 0.0, float("nan")
        self.unet.train()
        first = step + 1
        while step < self.max_steps:
            self._optimizer_step(step)
            step += 1
            if step == first and acc.is_main_process:  # a folder that trained holds its config
                write_config(self.run_dir, self.cfg)
            bar.update(1)
            record = self._log_record(step)
            if record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            h0 = time.perf_counter()
            self._after_step(step, record)
            self.hook_s += time.perf_counter() - h0
        bar.close()
        last = ckpt.resumable(self.run_dir)
        ips = self.steps_timed * self.bs * world * self.accum / self.time_timed if self.time_timed else float("nan")
        return {"run_dir": str(self.run_dir), "step": step, "loss": self.last_loss, "images_per_s": ips,
                "checkpoint": str(last[-1][1]) if last else None}

    def _optimizer_step(self, step: int) -> None:
        acc, t = self.acc, self.cfg.train
        seed, rank, world = int(self.cfg.seed), acc.process_index, acc.num_processes
        for k in range(self.accum):
            micro = step * self.accum + k
            idx = batch_indices(self.job.n, micro, self.bs, rank, world, seed)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + micro * world + rank)
            x0, cond = self.job.batch(idx, gen)
            x0 = x0.to(acc.device)
            net = self.unet if cond is None else Conditioned(self.unet, cond.to(acc.device))
            with acc.accumulate(self.unet):
                loss = setup.diffusion_loss(net, self.job.noise_scheduler, x0, gen)
                acc.backward(loss)
                if acc.sync_gradients and float(t.max_grad_norm) > 0:
                    acc.clip_grad_norm_(self.unet.parameters(), float(t.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.loss_sum += loss.detach().float().item()
            self.loss_n += 1
        self.lr_scheduler.step()
        self.ema.step(self.unet.parameters())

    def _log_record(self, step: int) -> dict:
        """Loss, LR, throughput and epoch every train.log_every steps (and at the last step)."""
        if step % int(self.cfg.train.log_every) and step != self.max_steps:
            return {}
        world = self.acc.num_processes
        self.last_loss = _gather_mean(self.acc, self.loss_sum / max(self.loss_n, 1))
        dt = time.perf_counter() - self.t_log - self.hook_s
        images = (step - self.from_step) * self.bs * world * self.accum
        self.steps_timed, self.time_timed = self.steps_timed + step - self.from_step, self.time_timed + dt
        record = {"loss": self.last_loss, "lr": self.lr_scheduler.get_last_lr()[0],
                  "images_per_s": images / max(dt, 1e-9),
                  "epoch": step * self.bs * world * self.accum / self.job.n}
        self.loss_sum, self.loss_n, self.t_log, self.hook_s, self.from_step = 0.0, 0, time.perf_counter(), 0.0, step
        return record

    def _after_step(self, step: int, record: dict) -> None:
        """EMA hooks and snapshot (main process), the step's metrics record, then the checkpoint."""
        t = self.cfg.train
        last = step == self.max_steps
        ckpt_due = step % int(t.checkpoint_every) == 0 or last
        snap_due = step in self.snapshot_steps
        sample_due = (self.job.sample is not None and int(t.get("sample_every", 0)) > 0
                      and (step % int(t.sample_every) == 0 or last))
        hooks = [h for h in self.job.ema_hooks if h.due(step)]
        if self.acc.is_main_process:
            if sample_due or hooks or snap_due or ckpt_due:
                record = {**record, **self._with_ema(step, sample_due, hooks, snap_due or ckpt_due, snap_due)}
            if record:
                self.metrics.write({"step": step, **record})
        if ckpt_due:
            self._checkpoint(step)

    def _with_ema(self, step: int, sample_due: bool, hooks: list, heldout_due: bool, snap_due: bool) -> dict:
        job, out = self.job, {}
        model = self.acc.unwrap_model(self.unet)
        model.eval()
        with ckpt.ema_weights(model, self.ema), torch.no_grad():
            if sample_due:
                latents = job.sample(model)
                images = save_sample_grid(self.run_dir, step, latents, job.first_stage)
                out |= job.probes.samples(step, latents, images)
            for h in hooks:
                out |= h(model)
            if heldout_due:
                out |= job.probes.heldout(step, model)
        if snap_due:  # ema_weights swaps in and out itself
            ckpt.save_snapshot(self.run_dir, step, model, self.ema, job.noise_scheduler, job.first_stage.describe())
        model.train()
        return out

    def _checkpoint(self, step: int) -> None:
        acc, t = self.acc, self.cfg.train
        if acc.is_main_process:
            ckpt.save_checkpoint(self.run_dir, step, acc.unwrap_model(self.unet), self.ema, self.optimizer,
                                 self.lr_scheduler, self.job.noise_scheduler, self.job.first_stage.describe(),
                                 {"max_steps": self.max_steps}, acc.scaler)
            ckpt.rotate(self.run_dir, int(t.checkpoints_total_limit))
        acc.wait_for_everyone()


def _gather_mean(acc, value: float) -> float:
    v = torch.tensor([value], device=acc.device)
    return float(acc.gather(v).mean())
