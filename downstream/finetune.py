"""Conditional latent-diffusion fine-tuning shared by both downstream tasks.

The task glue around train.engine: the start point is either a foundation checkpoint
(`backbone=RUN_DIR`, loaded through train.generate.load_backbone) or the same architecture from
random weights (`backbone=none`); either way the condition enters through zero-initialised extra
input channels (downstream.conditioning.widen_conv_in). The loop, checkpoints, EMA, metrics.jsonl
and resume are train.engine's, so a fine-tune run folder has train/'s layout (rsprune.layout).
Here: latent caching and the latent scale of scratch runs; sampling is train.generate.sample_latents
(with `cond`), decoding FirstStage.decode_uint8.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rsprune import layout
from rsprune.cache import read_json, save_npy, stable_hash, verified
from rsprune.fingerprint import array_digest
from rsprune.cli import UsageError

log = logging.getLogger(__name__)


SCRATCH_RESOLUTION = 64  # the train/ CPU default; a backbone brings its own


def load_start(cfg, resolution: int | None):
    """(unet, scheduler, first_stage, info): the backbone checkpoint or a fresh network.

    `resolution` None means the backbone's training resolution. For `backbone=none` the first stage comes unscaled; `fit_latent_scale` sets its scale from
    the training latents, as train/ does.
    """
    from train.first_stage import build_first_stage
    from train.setup import build_noise_scheduler, build_unet

    if cfg.train.cpu_threads:  # fewer threads than cores avoids spin-wait contention on a shared CPU
        torch.set_num_threads(int(cfg.train.cpu_threads))
    src = cfg.backbone
    if src not in (None, "none", "None", ""):
        from train.generate import load_backbone

        if not Path(str(src)).is_dir():
            raise UsageError(f"backbone folder not found: {src} (backbone=RUN_DIR of a train run, or none)")
        unet, scheduler, fs, info = load_backbone(str(src), step=cfg.backbone_step, ema=True)
        if resolution is not None and info["image_size"] != int(resolution):
            raise UsageError(f"backbone {src} was trained at {info['image_size']} px but {cfg.task} asks for "
                             f"{resolution} px; set resolution={info['image_size']}")
        return unet.train().requires_grad_(True), scheduler, fs, {"backbone": str(src)} | info
    fs = build_first_stage(cfg.autoencoder, cache_dir=cfg.cache_dir)
    resolution = int(resolution or SCRATCH_RESOLUTION)
    if resolution % fs.downscale:
        raise UsageError(f"resolution {resolution} is not a multiple of the autoencoder's {fs.downscale}")
    torch.manual_seed(int(cfg.seed))
    unet = build_unet(cfg.unet, fs.latent_channels, resolution // fs.downscale)  # train/'s builder and checks
    scheduler = build_noise_scheduler(cfg.scheduler)  # the training builder: same defaults and checks
    return unet, scheduler, fs, {"backbone": "none", "step": 0, "image_size": resolution,
                                 "first_stage": fs.describe()}


def default_run_dir(cfg, *parts) -> str:
    """`outputs/downstream/<task>/<start>[-<part>...]-s<seed>`: every downstream run folder's name
    when run_dir is not given (the task adds what tells its runs apart, e.g. sr's condition)."""
    return f"outputs/downstream/{cfg.task}/" + "-".join([start_name(cfg), *map(str, parts), f"s{cfg.seed}"])


def start_name(cfg) -> str:
    """Run-folder name of the start point: the backbone folder's name (and step), or scratch."""
    if str(cfg.backbone) in ("none", "None", ""):
        return "scratch"
    name = Path(str(cfg.backbone)).resolve().name
    return name if cfg.backbone_step is None else f"{name}-step{int(cfg.backbone_step)}"


def encode_cached(fs, images: np.ndarray, ident, cache_dir, batch_size: int = 32) -> np.ndarray:
    """Raw (unscaled) latents of uint8 NHWC images, cached under a key of (first stage, `ident`,
    the images' bytes): files overwritten in place decode to other pixels, hence another key."""
    key = stable_hash({k: v for k, v in fs.describe().items() if k not in ("scale", "shift")}, ident,
                      array_digest(images), n=20)
    path = layout.cache_path(cache_dir, layout.CACHE_DOWNSTREAM, f"latents-{key}.npy")
    if verified(path):  # a damaged or unverifiable entry is warned about, removed and recomputed
        z = np.load(path)
        if len(z) == len(images):
            return z
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255)
        out.append(fs.encode_raw(x).cpu().float().numpy())
    # C order, as np.load gives it back: the encoder's output is channels-last, and a strided array
    # made a cold run's latent scale and its UNet inputs (hence its weights) differ from a run
    # reading the cache (~1e-5 after one step).
    z = np.ascontiguousarray(np.concatenate(out))
    save_npy(path, z, checksum=True)
    return z


def fit_latent_scale(fs, raw: np.ndarray) -> None:
    """Shift and scale so the training latents have zero mean and unit std (scratch runs only)."""
    fs.shift = float(raw.mean())
    fs.scale = float(1.0 / max(raw.std(), 1e-6))


def scaled(fs, raw: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(raw) - fs.shift) * fs.scale


# --- training (through train.engine, the project's one training loop) ----------------------

def train(unet, scheduler, fs, z: torch.Tensor, c: torch.Tensor, cfg, run_dir) -> torch.nn.Module:
    """Fine-tune `unet` (already widened) on scaled latents z with conditions c; the EMA network.

    train.engine runs the loop, checkpoints and resume: a rerun continues from the newest complete
    checkpoint in run_dir, and a run already at train.max_steps trains no more.
    """
    from train import engine

    acc = engine.accelerator(cfg)
    job = engine.Job(unet, scheduler, fs, len(z), batch=_pairs(z, c))
    _, net = engine.fit(acc, cfg, job, run_dir)
    return net


def _pairs(z: torch.Tensor, c: torch.Tensor):
    """batch(indices, generator): latents with their conditions (no latent flips: train.flip adds
    flipped images before encoding)."""
    def batch(idx, gen):
        idx = torch.from_numpy(idx)
        return z[idx], c[idx]
    return batch


def read_metrics(run_dir) -> dict | None:
    p = Path(run_dir) / "metrics.json"
    return read_json(p) if p.is_file() else None


def finished(cfg) -> tuple[str, dict | None]:
    """(config key, the run's metrics if it was already evaluated under this exact config)."""
    from omegaconf import OmegaConf

    key = stable_hash(OmegaConf.to_container(cfg, resolve=True))
    done = read_metrics(cfg.run_dir)
    if done and done.get("config_key") == key:
        log.info("already evaluated: %s", Path(cfg.run_dir) / "metrics.json")
        return key, done
    return key, None
