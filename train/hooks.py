"""Main-process side effects of training: metrics (jsonl + wandb), sample grids, the FD hook."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from rsprune import layout
from rsprune.cache import atomic_path, stable_hash
from rsprune.sheets import grid, write_png
from train.generate import generate

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl and mirrors it to wandb if it started."""

    def __init__(self, run_dir, cfg, resume_step: int):
        self.path = Path(run_dir) / layout.METRICS
        self._truncate_after(resume_step)
        self.wandb = _start_wandb(run_dir, cfg)

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to the resumed step: later ones are about to be redone, and a line
        torn by a kill mid-write ends the log (nothing after it is trusted). A fresh run (step 0)
        starts an empty log."""
        if not self.path.exists():
            return
        with atomic_path(self.path) as tmp, open(tmp, "w") as out:  # streamed: a huge line is not loaded
            for line, record in layout.read_metrics(self.path) if step > 0 else ():
                if int(record.get("step", 0)) > step:
                    break
                out.write(line + "\n")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")  # one write call: a kill leaves at most one torn line
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir, cfg):
    if cfg.get("wandb") is None:  # downstream configs have no wandb section
        return None
    mode = os.environ.get("WANDB_MODE", str(cfg.wandb.mode))
    if mode == "disabled":
        return None
    try:
        import wandb
        from omegaconf import OmegaConf

        run_id = stable_hash(str(Path(run_dir).resolve()), n=12)  # same run id when resuming
        return wandb.init(project=str(cfg.wandb.project), mode=mode, dir=str(run_dir), id=run_id,
                          name=Path(run_dir).name, resume="allow",
                          config=OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # logging must never stop training; metrics.jsonl still has everything
        log.warning("wandb disabled: %s", " ".join(str(e).split())[:200])
        return None


def save_sample_grid(run_dir, step: int, latents: torch.Tensor, first_stage, batch_size: int = 32) -> np.ndarray:
    """Decode scaled sample latents into samples/step_XXXXXXX.png (one grid); the uint8 NHWC images."""
    imgs = first_stage.decode_uint8(latents, batch_size)
    out = layout.sample_path(run_dir, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid(imgs), out)
    return imgs


def decode_samples(unet, noise_scheduler, first_stage, n: int, seed: int, steps: int, batch_size: int = 32):
    """uint8 NHWC images from the model as it is now (the caller swaps in the EMA weights)."""
    return generate((unet, noise_scheduler, first_stage), n, seed, steps=steps, sampler="ddim", batch_size=batch_size)


class FDHook:
    """A smoke-check Fréchet distance (`fd_smoke`) of a few generated samples to held-out real images."""

    def __init__(self, cfg, real_fn, noise_scheduler, first_stage):
        self.every = int(cfg.eval.fd_every)
        self.cfg, self.real_fn, self.real = cfg, real_fn, None
        self.noise_scheduler, self.first_stage = noise_scheduler, first_stage

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, unet) -> dict:
        from rsprune.features import frechet_distance_from_images  # lazy: loads the feature network

        if self.real is None:
            self.real = self.real_fn()
        c = self.cfg.eval
        fake = decode_samples(unet, self.noise_scheduler, self.first_stage, int(c.fd_samples), 0, int(c.fd_steps))
        res = c.get("fd_resolution")  # features at the images' own resolution (paper_gpu: 256)
        r = frechet_distance_from_images(self.real, fake, feature=str(c.fd_feature),
                                         overrides={"resolution": int(res)} if res else None)
        # A smoke check, not a result: FD of tens of samples is dominated by its small-N bias.
        # Results come from eval/convergence.py (>= 1,000 samples against the whole test split).
        return {"fd_smoke": float(r["fd"]), "fd_feature": r.get("feature", str(c.fd_feature)),
                "fd_n_real": int(r.get("n_real", len(self.real))), "fd_n_fake": int(r.get("n_fake", len(fake)))}
