"""Main-process side effects of training: metrics (jsonl + wandb), the config check, sample grids, the FD hook."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from rsprune import layout
from rsprune.cache import atomic_path, stable_hash, write_text
from rsprune.cli import UsageError
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
        keep = []
        for line in self.path.read_text().splitlines() if step > 0 else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: dropped a torn line and everything after it", self.path)
                break
            if not isinstance(record, dict) or int(record.get("step", 0)) > step:
                break
            keep.append(line)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")  # one write call: a kill leaves at most one torn line
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# Config keys a rerun in the same run_dir may change: none alters the training trajectory up to the
# resumed step (max_steps may grow, which is how a run is extended; a cosine decay_steps that
# follows it stretches the schedule from the resumed step on). A prefix ending in "." covers a section.
MAY_DIFFER = ("train.max_steps", "optim.decay_steps", "train.log_every", "train.cpu_threads",
              "train.checkpoint_every", "train.checkpoints_total_limit", "train.snapshot_steps",
              "train.sample_every", "train.sample_n", "train.sample_steps", "train.sample_seed",
              "data.num_workers", "data.encode_batch_size", "cache_dir", "run_dir",
              "wandb.", "eval.", "report.", "segnet.", "sr.test", "sr.max_test")


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
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>") and not _may_differ(k))


def check_config(run_dir, cfg, write: bool) -> None:
    """Refuse (UsageError, exit 2) a run_dir that holds a run of another config; then (if `write`)
    store this config as config.yaml."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / layout.CONFIG
    new = OmegaConf.to_container(cfg, resolve=True)
    if path.is_file():
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        bad = config_changes(old, new)
        if bad:
            fa, fb = _flat(old), _flat(new)
            shown = "; ".join(f"{k}: {fa.get(k, '<absent>')} -> {fb.get(k, '<absent>')}" for k in bad[:6])
            raise UsageError(f"{run_dir} holds a run with another config ({shown}{' ...' if len(bad) > 6 else ''}); "
                             "rerun with its values or choose another run_dir")
    if write:
        write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


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
