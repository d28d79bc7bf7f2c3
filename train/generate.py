"""Public API over a training run folder: find checkpoints, load the backbone, generate images.

    from train.generate import list_checkpoints, load_backbone, generate
    unet, scheduler, first_stage, info = load_backbone("outputs/train/x")   # latest, EMA weights
    images = generate("outputs/train/x", n=64, seed=0, steps=50)              # uint8 (N, H, W, 3)

A checkpoint folder `run_dir/checkpoints/step_XXXXXXX/` holds `unet/`, `unet_ema/` and
`scheduler/` (diffusers `save_pretrained` folders), `first_stage.json` (how to rebuild the
autoencoder and the latent scale), `optimizer.safetensors` and `trainer_state.json` (train/checkpoint.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsprune.cache import read_json
from rsprune import layout
from rsprune.cli import UsageError
from rsprune.device import resolve

SAMPLERS = ("ddim", "ddpm", "dpm")


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first (temporary folders excluded)."""
    return [(s, p) for s, p in layout.step_folders(Path(run_dir) / layout.CHECKPOINTS)
            if (p / "unet").is_dir() and (p / "first_stage.json").is_file()]


def list_snapshots(run_dir) -> list[tuple[int, Path]]:
    """Every scorable EMA state of a run as (step, path), oldest first: the light EMA snapshots
    (`snapshots/`, never rotated) plus complete checkpoints; one per step, the snapshot first."""
    found = {s: p for s, p in list_checkpoints(run_dir)}
    for s, p in layout.step_folders(Path(run_dir) / layout.SNAPSHOTS):
        if (p / "unet_ema").is_dir() and (p / "scheduler").is_dir() and (p / "first_stage.json").is_file():
            found[s] = p
    return sorted(found.items())


def _pick(run_dir, step: int | None) -> tuple[int, Path]:
    ckpts = list_snapshots(run_dir)
    if not ckpts:
        raise UsageError(f"no checkpoint or snapshot in {run_dir}; train first "
                         "(accelerate launch train/main.py run_dir=...)")
    if step is None:
        return ckpts[-1]
    for s, p in ckpts:
        if s == step:
            return s, p
    raise UsageError(f"no checkpoint or snapshot at step {step} in {run_dir}; have {[s for s, _ in ckpts]}")


def load_backbone(run_dir, step: int | None = None, ema: bool = True, device: str | torch.device = "cpu"):
    """(unet, scheduler, first_stage, info) of a run's checkpoint (latest if step is None).

    `ema=True` loads the EMA weights (what samples and evaluation use); `info` holds the step,
    checkpoint path, first-stage description and latent shape.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from rsprune.autoencoders import from_description

    s, path = _pick(run_dir, step)
    sub = "unet_ema" if ema and (path / "unet_ema").is_dir() else "unet"
    unet = UNet2DModel.from_pretrained(path / sub).to(device).eval().requires_grad_(False)
    # clip_sample=False whatever the saved config says: clipping scaled latents to +-1 cuts ~30% of
    # their values (older runs saved diffusers' default, True).
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler", clip_sample=False)
    from train.setup import check_conditioning

    check_conditioning(scheduler, allow=True)  # an old epsilon run still loads, with a warning
    desc = read_json(path / "first_stage.json")
    first_stage = from_description(desc, device)
    size = int(unet.config.sample_size)
    info = {"step": s, "path": str(path), "weights": sub, "first_stage": desc,
            "latent_shape": [int(unet.config.in_channels), size, size],
            "image_size": size * int(desc["downscale"])}
    return unet, scheduler, first_stage, info


def make_sampler(scheduler, sampler: str):
    """A sampling scheduler sharing the training scheduler's betas and prediction type.

    Never clips or thresholds (latents at unit std have ~30% of values beyond +-1), and its
    timesteps are "trailing": the first step is t = T-1, where the sampler starts from pure noise.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}
    if sampler not in classes:
        raise UsageError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    return classes[sampler].from_config(scheduler.config, clip_sample=False, thresholding=False,
                                        timestep_spacing="trailing")


@torch.no_grad()
def sample_latents(unet, scheduler, n: int | None, seed: int, steps: int = 50, sampler: str = "ddim",
                   batch_size: int = 32, progress: bool = False, cond: torch.Tensor | None = None) -> torch.Tensor:
    """n latents (scaled, on the CPU) by reverse diffusion: the one sampler of the project.

    With `cond` (N, c, h, w), image i is conditioned on cond[i] (concatenated to the UNet input at
    every step; n defaults to len(cond)). The noise of image i depends only on (seed, i), so
    reruns and other batch sizes give the same images.
    """
    if cond is not None:
        n = len(cond) if n is None else n
        if len(cond) != n:
            raise ValueError(f"{len(cond)} conditions for {n} samples")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    c, size = int(unet.config.out_channels), int(unet.config.sample_size)  # in_channels also count a condition
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(n, c, size, size, generator=g)  # drawn once on CPU: same images on any device
    out = []
    from tqdm import tqdm

    bar = tqdm(total=n, desc="sampling", unit="img", disable=not progress)
    for i in range(0, n, batch_size):
        sched = make_sampler(scheduler, sampler)
        sched.set_timesteps(steps)
        x = noise[i:i + batch_size].to(device) * sched.init_noise_sigma
        ci = None if cond is None else cond[i:i + batch_size].to(device)
        gb = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)  # stochastic samplers' noise
        for t in sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            if ci is not None:
                model_in = torch.cat([model_in, ci], 1)
            pred = unet(model_in.to(dtype), t).sample.float()
            kwargs = {"generator": gb} if sampler == "ddpm" else {}
            x = sched.step(pred, t, x, **kwargs).prev_sample
        out.append(x.float().cpu())
        bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else noise


def generate(run_dir_or_loaded, n: int, seed: int = 0, steps: int = 50, sampler: str = "ddim",
             batch_size: int = 32, step: int | None = None, device: str | torch.device | None = None,
             progress: bool = False) -> np.ndarray:
    """n images as uint8 (N, H, W, 3) from a run folder (latest EMA) or a load_backbone() tuple;
    `device` None: rsprune.device.resolve's auto."""
    if isinstance(run_dir_or_loaded, (str, Path)):
        loaded = load_backbone(run_dir_or_loaded, step=step, ema=True, device=resolve(device))
    else:
        loaded = run_dir_or_loaded
    unet, scheduler, first_stage = loaded[0], loaded[1], loaded[2]
    z = sample_latents(unet, scheduler, n, seed, steps, sampler, batch_size, progress)
    return first_stage.decode_uint8(z, batch_size)
