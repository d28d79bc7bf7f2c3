"""Main-process side effects of training: metrics (jsonl + wandb), sample grids, the FD hook."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from rsprune import layout
from rsprune.cache import atomic_path, stable_hash
from train.generate import generate, image_grid

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl and mirrors it to wandb if it started."""

    def __init__(self, run_dir, cfg, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.wandb = _start_wandb(run_dir, cfg)

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after its last checkpoint: they are about to be redone."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir, cfg):
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


def save_sample_grid(run_dir, step: int, unet, noise_scheduler, first_stage, cfg):
    """Decode `train.sample_n` EMA samples with a fixed seed into samples/step_XXXXXXX.png.

    Returns (png path, the sampled latents, the decoded uint8 images) for the sample probes.
    """
    from PIL import Image

    from train.generate import sample_latents
    from train.probes import to_uint8

    z = sample_latents(unet, noise_scheduler, int(cfg.train.sample_n), int(cfg.train.sample_seed),
                       int(cfg.train.sample_steps))
    imgs = np.concatenate([to_uint8(first_stage.decode(z[i:i + 32])) for i in range(0, len(z), 32)])
    out = layout.sample_path(run_dir, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(image_grid(imgs)).save(tmp, format="PNG")
    return out, z, imgs


def decode_samples(unet, noise_scheduler, first_stage, n: int, seed: int, steps: int, batch_size: int = 32):
    """uint8 NHWC images from the model as it is now (the caller swaps in the EMA weights)."""
    return generate((unet, noise_scheduler, first_stage), n, seed, steps=steps, sampler="ddim", batch_size=batch_size)


class FDHook:
    """A smoke-check Fréchet distance (`fd_smoke`) of a few generated samples to held-out real images."""

    def __init__(self, cfg, real_fn):
        self.every = int(cfg.eval.fd_every)
        self.cfg, self.real_fn, self.real, self.fn = cfg, real_fn, None, None
        if self.every > 0:
            try:
                from eval.fid import frechet_distance_from_images  # lazy: the eval package is optional
                self.fn = frechet_distance_from_images
            except ImportError as e:
                log.warning("FD hook off: eval.fid.frechet_distance_from_images unavailable (%s)", e)
                self.every = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, unet, noise_scheduler, first_stage) -> dict:
        if self.real is None:
            self.real = self.real_fn()
        c = self.cfg.eval
        fake = decode_samples(unet, noise_scheduler, first_stage, int(c.fd_samples), 0, int(c.fd_steps))
        res = c.get("fd_resolution")  # features at the images' own resolution (paper_gpu: 256)
        r = self.fn(self.real, fake, feature=str(c.fd_feature), overrides={"resolution": int(res)} if res else None)
        # A smoke check, not a result: FD of tens of samples is dominated by its small-N bias.
        # Results come from eval/convergence.py (>= 1,000 samples against the whole test split).
        return {"fd_smoke": float(r["fd"]), "fd_feature": r.get("feature", str(c.fd_feature)),
                "fd_n_real": int(r.get("n_real", len(self.real))), "fd_n_fake": int(r.get("n_fake", len(fake)))}
