"""Builders for the second stage: UNet, noise scheduler, optimizer, LR schedule, EMA."""
from __future__ import annotations

import logging
import math

import torch
from omegaconf import OmegaConf

from rsprune.cli import UsageError

log = logging.getLogger(__name__)


def build_unet(unet_cfg, latent_channels: int, latent_size: int):
    """A diffusers UNet2DModel on (latent_channels, latent_size, latent_size) latents."""
    from diffusers import UNet2DModel

    kw = OmegaConf.to_container(unet_cfg, resolve=True)
    kw.pop("name", None)
    try:
        return UNet2DModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels, **kw)
    except (ValueError, TypeError, AssertionError) as e:
        raise UsageError(f"bad unet config: {' '.join(str(e).split())[:200]}") from None


# With epsilon prediction, DDIM's first x0 estimate is (x_t - sqrt(1 - a) eps) / sqrt(a): at a
# terminal alpha_bar `a` under this floor every eps error is multiplied by more than ~10 (34 at
# the cosine schedule's a = 9e-4), and unclipped samples diverge (issue 11: latent std 8.8 against
# 1.0 for the data). v-prediction stays well conditioned there; epsilon is refused unless allowed.
EPSILON_MIN_ALPHA_BAR = 0.01


def build_noise_scheduler(sched_cfg):
    """The training DDPMScheduler: never clips samples, trailing timesteps, optional zero-terminal-SNR betas.

    Every key comes from configs/trainer/default.yaml's `scheduler` (no default here to drift from it)."""
    from diffusers import DDPMScheduler

    pred = str(sched_cfg.prediction_type)
    if pred not in ("epsilon", "v_prediction"):
        raise UsageError(f"scheduler.prediction_type={pred!r}; expected epsilon | v_prediction")
    spacing = str(sched_cfg.timestep_spacing)
    if spacing not in ("trailing", "leading", "linspace"):
        raise UsageError(f"scheduler.timestep_spacing={spacing!r}; expected trailing | leading | linspace")
    try:
        sched = DDPMScheduler(num_train_timesteps=int(sched_cfg.num_train_timesteps),
                              beta_schedule=str(sched_cfg.beta_schedule), prediction_type=pred,
                              clip_sample=False, timestep_spacing=spacing,
                              rescale_betas_zero_snr=bool(sched_cfg.rescale_betas_zero_snr))
    except NotImplementedError as e:  # diffusers' message for an unknown beta_schedule
        raise UsageError(f"scheduler.beta_schedule={sched_cfg.beta_schedule!r}: {e}") from None
    check_conditioning(sched, allow=bool(sched_cfg.allow_epsilon_low_snr))
    return sched


def check_conditioning(scheduler, allow: bool) -> None:
    """Refuse (or with `allow`, warn about) epsilon prediction on a schedule whose alpha_bar reaches ~0."""
    if scheduler.config.prediction_type != "epsilon":
        return
    low = float(scheduler.alphas_cumprod[-1])
    if low >= EPSILON_MIN_ALPHA_BAR:
        return
    msg = (f"epsilon prediction with a schedule whose terminal alpha_bar is {low:.2g} (< {EPSILON_MIN_ALPHA_BAR}): "
           f"the sampler's first x0 estimate multiplies noise errors by {((1 - low) / max(low, 1e-12)) ** 0.5:.0f}")
    if not allow:
        raise UsageError(msg + "; use scheduler.prediction_type=v_prediction "
                         "(or scheduler.allow_epsilon_low_snr=true to train it anyway)")
    log.warning("%s; samples may diverge", msg)


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas),
                             weight_decay=float(optim_cfg.weight_decay), eps=float(optim_cfg.eps))


def lr_factor(step: int, optim_cfg) -> float:
    """Multiplier of the base LR at optimizer step `step`: linear warm-up, then constant or cosine."""
    warm = int(optim_cfg.warmup_steps)
    if step < warm:
        return (step + 1) / warm
    if optim_cfg.schedule == "constant":
        return 1.0
    if optim_cfg.schedule != "cosine":
        raise UsageError(f"optim.schedule={optim_cfg.schedule!r}; expected constant | cosine")
    total = max(int(optim_cfg.decay_steps) - warm, 1)
    progress = min((step - warm) / total, 1.0)
    low = float(optim_cfg.min_lr_ratio)
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer, optim_cfg):
    """A LambdaLR stepped once per optimizer step (not prepared by accelerate, which would step it
    once per process); its state is saved with the checkpoint."""
    lr_factor(int(optim_cfg.warmup_steps), optim_cfg)  # validate the schedule name now
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim_cfg))


def build_ema(unet, ema_cfg):
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=float(ema_cfg.decay), use_ema_warmup=bool(ema_cfg.use_warmup),
                    inv_gamma=float(ema_cfg.inv_gamma), power=float(ema_cfg.power),
                    model_cls=UNet2DModel, model_config=unet.config)


def diffusion_loss(unet, noise_scheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon / v target at random timesteps.

    Noise and timesteps come from `generator` (seeded per step) so that a resumed run draws
    exactly what the uninterrupted run drew.
    """
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(x0.device)
    xt = noise_scheduler.add_noise(x0, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    pred = unet(xt, t).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
