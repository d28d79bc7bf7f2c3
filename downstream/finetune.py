"""Conditional latent-diffusion fine-tuning shared by both downstream tasks.

The start point is either a foundation checkpoint (`backbone=RUN_DIR`, loaded through
train.generate.load_backbone) or the same architecture from random weights (`backbone=none`);
either way the condition enters through zero-initialised extra input channels
(downstream.conditioning.widen_conv_in). Training follows the house idiom: accelerate for the
device, AdamW with warm-up, an EMA copy for evaluation, checkpoints in
`run_dir/checkpoints/step_XXXXXXX/` (same layout as train/), and resume by rerunning the same
command; the batch order, noise and timesteps of step k depend only on (seed, k).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsprune.cache import read_json, save_npy, stable_hash, write_json
from rsprune.cli import UsageError

log = logging.getLogger(__name__)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


SCRATCH_RESOLUTION = 64  # the train/ CPU default; a backbone brings its own


def load_start(cfg, resolution: int | None):
    """(unet, scheduler, first_stage, info): the backbone checkpoint or a fresh network.

    `resolution` None means the backbone's training resolution. For `backbone=none` the first stage comes unscaled; `fit_latent_scale` sets its scale from
    the training latents, as train/ does.
    """
    from diffusers import UNet2DModel

    from rsprune.autoencoders import build_first_stage
    from train.setup import build_noise_scheduler

    if cfg.train.get("cpu_threads"):  # fewer threads than cores avoids spin-wait contention on a shared CPU
        torch.set_num_threads(int(cfg.train.cpu_threads))
    src = cfg.backbone
    if src not in (None, "none", "None", ""):
        from train.generate import load_backbone

        if not Path(str(src)).is_dir():
            raise UsageError(f"backbone folder not found: {src} (backbone=RUN_DIR of a train run, or none)")
        unet, scheduler, fs, info = load_backbone(str(src), step=cfg.get("backbone_step"), ema=True)
        if resolution is not None and info["image_size"] != int(resolution):
            raise UsageError(f"backbone {src} was trained at {info['image_size']} px but {cfg.task} asks for "
                             f"{resolution} px; set resolution={info['image_size']}")
        return unet.train().requires_grad_(True), scheduler, fs, {"backbone": str(src)} | info
    fs = build_first_stage(cfg.autoencoder, cache_dir=cfg.cache_dir)
    resolution = int(resolution or SCRATCH_RESOLUTION)
    if resolution % fs.downscale:
        raise UsageError(f"resolution {resolution} is not a multiple of the autoencoder's {fs.downscale}")
    from omegaconf import OmegaConf

    arch = {k: v for k, v in OmegaConf.to_container(cfg.unet, resolve=True).items() if k != "name"}
    torch.manual_seed(int(cfg.seed))
    unet = UNet2DModel(sample_size=resolution // fs.downscale, in_channels=fs.latent_channels,
                       out_channels=fs.latent_channels, **arch)
    scheduler = build_noise_scheduler(cfg.scheduler)  # the training builder: same defaults and checks
    return unet, scheduler, fs, {"backbone": "none", "step": 0, "image_size": resolution,
                                 "first_stage": fs.describe()}


def start_name(cfg) -> str:
    """Run-folder name of the start point: the backbone folder's name (and step), or scratch."""
    if str(cfg.backbone) in ("none", "None", ""):
        return "scratch"
    name = Path(str(cfg.backbone)).resolve().name
    return name if cfg.get("backbone_step") is None else f"{name}-step{int(cfg.backbone_step)}"


def encode_cached(fs, images: np.ndarray, ident, cache_dir, batch_size: int = 32) -> np.ndarray:
    """Raw (unscaled) latents of uint8 NHWC images, cached under a key of (first stage, images)."""
    key = stable_hash({k: v for k, v in fs.describe().items() if k not in ("scale", "shift")}, ident, n=20)
    path = Path(cache_dir) / "downstream" / f"latents-{key}.npy"
    if path.is_file():
        z = np.load(path)
        if len(z) == len(images):
            return z
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255)
        out.append(fs.encode_raw(x).cpu().float().numpy())
    z = np.concatenate(out)
    save_npy(path, z)
    return z


def fit_latent_scale(fs, raw: np.ndarray) -> None:
    """Shift and scale so the training latents have zero mean and unit std (scratch runs only)."""
    fs.shift = float(raw.mean())
    fs.scale = float(1.0 / max(raw.std(), 1e-6))


def scaled(fs, raw: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(raw) - fs.shift) * fs.scale


# --- training ---------------------------------------------------------------------------------

def lr_lambda(optim_cfg, max_steps: int):
    """Linear warm-up, then constant or cosine down to min_lr_ratio at max_steps."""
    warm = int(optim_cfg.get("warmup_steps", 0))
    kind = optim_cfg.get("schedule", "constant")
    floor = float(optim_cfg.get("min_lr_ratio", 0.0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            p = min(1.0, (step - warm) / max(1, max_steps - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0
    return f


def diffusion_target(scheduler, z0, noise, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":
        return z0
    raise UsageError(f"unsupported prediction_type {kind!r}")


def latest_state(run_dir) -> tuple[int, Path | None]:
    from train.generate import list_checkpoints

    ckpts = [(s, p) for s, p in list_checkpoints(run_dir) if (p / "state.pt").is_file()]
    return ckpts[-1] if ckpts else (0, None)


def train(unet, scheduler, fs, z: torch.Tensor, c: torch.Tensor, cfg, run_dir) -> torch.nn.Module:
    """Fine-tune `unet` (already widened) on latents z with conditions c; returns the EMA network.

    Reruns resume from the latest checkpoint in run_dir; a run already at max_steps trains no more.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    tc, run_dir = cfg.train, Path(run_dir)
    acc = Accelerator(mixed_precision=str(tc.mixed_precision), cpu=not torch.cuda.is_available())
    opt = torch.optim.AdamW(unet.parameters(), lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas),
                            weight_decay=float(cfg.optim.weight_decay), eps=float(cfg.optim.eps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, int(cfg.optim.get("decay_steps") or tc.max_steps)))
    ema = EMAModel(unet.parameters(), decay=float(tc.ema.decay), use_ema_warmup=bool(tc.ema.use_warmup),
                   inv_gamma=float(tc.ema.inv_gamma), power=float(tc.ema.power))
    step, path = latest_state(run_dir)
    if path is not None:
        from diffusers import UNet2DModel

        unet.load_state_dict(UNet2DModel.from_pretrained(path / "unet").state_dict())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        log.info("resumed from %s", path)
    unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    n, bs = len(z), min(int(tc.batch_size), len(z))
    T = int(scheduler.config.num_train_timesteps)
    while step < int(tc.max_steps):
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
        idx = torch.randint(n, (bs,), generator=g)
        z0, cond = z[idx], c[idx]  # no latent flips: train.flip adds flipped images before encoding
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, T, (bs,), generator=g)
        z0, cond, noise, t = (x.to(acc.device) for x in (z0, cond, noise, t))
        zt = scheduler.add_noise(z0, noise, t)
        with acc.autocast():
            pred = unet(torch.cat([zt, cond], 1), t).sample
        loss = F.mse_loss(pred.float(), diffusion_target(scheduler, z0, noise, t).float())
        acc.backward(loss)
        if float(tc.max_grad_norm) > 0:
            acc.clip_grad_norm_(unet.parameters(), float(tc.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        step += 1
        if step % int(tc.log_every) == 0 or step == 1:
            _log(run_dir, {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
        if step % int(tc.checkpoint_every) == 0 or step == int(tc.max_steps):
            save_checkpoint(run_dir, step, acc.unwrap_model(unet), ema, opt, sched, scheduler, fs,
                            int(tc.checkpoints_total_limit))
    net = acc.unwrap_model(unet)
    ema.copy_to(net.parameters())
    return net.eval().requires_grad_(False)


def _log(run_dir: Path, row: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info("step %(step)d loss %(loss).4f", row)


def save_checkpoint(run_dir: Path, step: int, unet, ema, opt, sched, scheduler, fs, limit: int) -> None:
    """Write checkpoints/step_XXXXXXX/ atomically (temp folder + rename); keep the newest `limit`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        unet.save_pretrained(tmp / "unet")
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        unet.save_pretrained(tmp / "unet_ema")
        ema.restore(unet.parameters())
        scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / "first_stage.json", fs.describe())
        torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "ema": ema.state_dict(), "step": step}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    old = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in old[:-max(1, limit)]:
        shutil.rmtree(p, ignore_errors=True)


# --- sampling ---------------------------------------------------------------------------------

@torch.no_grad()
def sample(unet, scheduler, cond: torch.Tensor, seed: int, steps: int = 50, sampler: str = "ddim",
           batch_size: int = 16) -> torch.Tensor:
    """Latents by reverse diffusion with the condition concatenated at every step.

    The starting noise of item i depends only on (seed, i), so reruns and different batch sizes
    give the same outputs.
    """
    from train.generate import make_sampler

    dev = next(unet.parameters()).device
    ch, size = int(unet.config.out_channels), int(unet.config.sample_size)
    noise = torch.randn(len(cond), ch, size, size, generator=torch.Generator().manual_seed(int(seed)))
    out = []
    for i in range(0, len(cond), batch_size):
        s = make_sampler(scheduler, sampler)
        s.set_timesteps(int(steps))
        x = noise[i:i + batch_size].to(dev) * s.init_noise_sigma
        c = cond[i:i + batch_size].to(dev)
        for t in s.timesteps:
            pred = unet(torch.cat([s.scale_model_input(x, t), c], 1), t).sample
            x = s.step(pred.float(), t, x).prev_sample
        out.append(x.cpu().float())
    return torch.cat(out)


def decode_uint8(fs, z: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Scaled latents -> uint8 NHWC images."""
    out = []
    for i in range(0, len(z), batch_size):
        x = fs.decode(z[i:i + batch_size].to(fs.device)).cpu()
        out.append((x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


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
