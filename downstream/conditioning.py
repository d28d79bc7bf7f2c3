"""Conditioning as extra input channels of a diffusers UNet2DModel.

`widen_conv_in` adds input channels to the backbone's first convolution with zero weights, so
at step 0 the widened UNet computes exactly what the backbone computes whatever the condition
is; fine-tuning then learns how much of the condition to let in (the ControlNet / SD-upscaler
idea, here with no extra network). The condition maps for the two tasks live here too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rsprune.cli import UsageError


def widen_conv_in(unet, extra: int):
    """A copy of `unet` taking `in_channels + extra` input channels; the new weights are zero."""
    from diffusers import UNet2DModel

    if extra < 0:
        raise ValueError(f"extra channels must be >= 0, got {extra}")
    cfg = dict(unet.config)
    old_in = int(cfg["in_channels"])
    cfg["in_channels"] = old_in + extra
    # Keys starting with "_" are diffusers bookkeeping, not constructor arguments.
    wide = UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    wide.load_state_dict(state, strict=True)
    dtype = next(unet.parameters()).dtype
    return wide if dtype == torch.float32 else wide.to(dtype=dtype)


def condition_channels(task_cfg, first_stage) -> int:
    """How many channels the SR condition adds (semantic synthesis adds one per class, its own count)."""
    kind = task_cfg.condition
    if kind == "latent":
        return int(first_stage.latent_channels)
    if kind == "pixels":
        f = int(first_stage.downscale) // int(task_cfg.scale)
        return 3 * f * f
    raise UsageError(f"unknown condition {kind!r}; expected latent | pixels")


def pixels_condition(lr01: torch.Tensor, latent_size: int) -> torch.Tensor:
    """LR images (N, 3, h, w) in [0, 1] rearranged onto the latent grid (space-to-depth), in [-1, 1].

    The alternative to `latent` (the encoder's latents of the bicubic upsampling): no encoder
    pass, so nothing of the LR image is lost on the way in.
    """
    f = lr01.shape[-1] // latent_size
    if f < 1 or lr01.shape[-1] != f * latent_size:
        raise UsageError(f"pixels condition: LR side {lr01.shape[-1]} is not a multiple of the latent grid {latent_size}")
    return F.pixel_unshuffle(lr01 * 2 - 1, f)


def mask_condition(onehot: torch.Tensor, latent_size: int) -> torch.Tensor:
    """One-hot masks (N, K, H, W) -> class fractions on the latent grid (area average), in [-1, 1].

    Where a latent cell covers one class the map stays exactly one-hot (scaled to +-1); at class
    borders it keeps the fractions instead of picking one class.
    """
    frac = F.adaptive_avg_pool2d(onehot.float(), latent_size)
    return frac * 2 - 1


def with_flips(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array (N, H, W[, C]) followed by its horizontal mirror: [x; flip(x)], pixels flipped.

    Flip augmentation happens here, in pixel space, before anything is encoded: the autoencoder's
    latents do not commute with flips (TAEF2: decode(flip(encode x)) is 19 dB against 26 dB for
    encode(flip x), issue 11), so flipping latents would train on latents of no real image. Both
    orientations are encoded (and cached) once; the training loop never flips.
    """
    return tuple(np.concatenate([a, a[:, :, ::-1]]) for a in arrays)
