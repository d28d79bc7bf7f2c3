"""First-stage registry: the autoencoder that maps images to the latents a diffusion model learns.

Three kinds, chosen by `autoencoder.kind` (configs/autoencoder/*.yaml):
- `taef2` (offline default): the project's own TAEF2 module (rsprune/taef2.py) with weights from
  `autoencoder.path`; 32-channel latents at 1/8 resolution.
- `diffusers`: a pretrained diffusers `AutoencoderKL` from a hub id or a local folder
  (`autoencoder.id`, optional `subfolder`; `local_files_only` by default, since machines here
  are offline).
- `kl_small`: a small `AutoencoderKL` fitted on the training images for `autoencoder.max_steps`
  steps and cached under `cache_dir/autoencoders/` (max_steps=0: use the cached one); the fit is
  train/first_stage.py's, this module only loads it.

Every kind is wrapped in `FirstStage`, whose `encode(x01)` returns *scaled* latents
((raw - shift) * scale, unit std on the training set), `decode(z)` returns RGB in [0, 1] and
`decode_uint8(z)` uint8 NHWC images.
`describe()` gives the JSON that `from_description()` rebuilds it from (first_stage.json).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsprune.cli import UsageError

log = logging.getLogger(__name__)


class FirstStage(nn.Module):
    """An image autoencoder with a latent affine normalisation (shift, scale)."""

    def __init__(self, model: nn.Module, kind: str, source: dict, latent_channels: int, downscale: int,
                 scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind, self.source = kind, dict(source)
        self.latent_channels, self.downscale = latent_channels, downscale
        self.scale, self.shift = float(scale), float(shift)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_raw(self, x01: torch.Tensor) -> torch.Tensor:
        """Unscaled latents of RGB images in [0, 1] (N, 3, H, W)."""
        x01 = x01.to(self.device, torch.float32)
        if self.kind == "taef2":
            return self.model.encode(x01)
        # AutoencoderKL works on [-1, 1]; the posterior mean keeps cached latents deterministic.
        return self.model.encode(x01 * 2 - 1).latent_dist.mean

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.device, torch.float32)
        if self.kind == "taef2":
            return self.model.decode(z)
        return ((self.model.decode(z).sample + 1) / 2).clamp(0, 1)

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        """Scaled latents: unit std over the training set."""
        return (self.encode_raw(x01) - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] from scaled latents."""
        return self.decode_raw(z / self.scale + self.shift)

    def decode_uint8(self, z: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Scaled latents -> uint8 NHWC images (the one decode every sample path uses)."""
        out = [to_uint8(self.decode(z[i:i + batch_size]).cpu()) for i in range(0, len(z), batch_size)]
        if not out:
            side = int(z.shape[-1]) * self.downscale
            return np.zeros((0, side, side, 3), np.uint8)
        return np.concatenate(out)

    def describe(self) -> dict:
        out = {"kind": self.kind, "source": self.source, "latent_channels": self.latent_channels,
               "downscale": self.downscale, "scale": self.scale, "shift": self.shift}
        if getattr(self, "scale_from", None):  # where scale/shift came from (train: the corpus sample)
            out["scale_from"] = self.scale_from
        return out


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (N, 3, H, W) -> uint8 NHWC; values beyond [0, 1] land on 0 / 255."""
    return (x01.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_description(d: dict, device: str | torch.device = "cpu") -> FirstStage:
    """Rebuild the first stage written by `FirstStage.describe()` (first_stage.json)."""
    fs = _load(d["kind"], d["source"])
    fs.scale, fs.shift = float(d["scale"]), float(d["shift"])
    return fs.to(device)


def _load(kind: str, source: dict) -> FirstStage:
    if kind == "taef2":
        from rsprune.taef2 import TAEF2

        try:
            model = TAEF2.from_dir(source["path"])
        except FileNotFoundError as e:
            raise UsageError(f"{e} (set autoencoder.path=DIR)") from None
        return FirstStage(model, kind, source, TAEF2.latent_channels, TAEF2.downscale)
    if kind in ("diffusers", "kl_small"):
        model = _load_kl(source)
        down = 2 ** (len(model.config.block_out_channels) - 1)
        return FirstStage(model, kind, source, model.config.latent_channels, down)
    raise UsageError(f"unknown autoencoder kind {kind!r}; expected taef2 | diffusers | kl_small")


def _load_kl(source: dict):
    from diffusers import AutoencoderKL

    ident = source["id"]
    local = Path(ident).expanduser()
    kwargs = {"subfolder": source.get("subfolder") or None}
    try:
        if local.exists():
            return AutoencoderKL.from_pretrained(str(local), **kwargs)
        return AutoencoderKL.from_pretrained(ident, local_files_only=bool(source.get("local_files_only", True)),
                                             **kwargs)
    except Exception as e:  # missing folder/files, bad hub id, offline cache miss: all a config problem
        msg = " ".join(str(e).split())[:200]
        raise UsageError(f"cannot load AutoencoderKL {ident!r}: {msg}") from None


def build_first_stage(ae_cfg) -> FirstStage:
    """The pretrained first stage named by the `autoencoder` config group, unscaled (scale 1, shift 0).

    `kl_small` is fitted on training images: train.first_stage.build_first_stage builds every
    kind, that one included.
    """
    kind = ae_cfg.kind
    if kind == "taef2":
        return _load("taef2", {"path": str(Path(str(ae_cfg.path)).expanduser().resolve())})
    if kind == "diffusers":
        return _load("diffusers", {"id": str(ae_cfg.id), "subfolder": ae_cfg.get("subfolder"),
                                   "local_files_only": bool(ae_cfg.get("local_files_only", True))})
    if kind == "kl_small":
        raise UsageError("autoencoder kind kl_small is fitted on training images: build it with "
                         "train.first_stage.build_first_stage")
    raise UsageError(f"unknown autoencoder kind {kind!r}; expected taef2 | diffusers | kl_small")


def psnr(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two [0, 1] batches."""
    mse = ((x01.float() - y01.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def reconstruction_psnr(fs: FirstStage, images: np.ndarray, batch_size: int = 32) -> dict:
    """Mean and worst reconstruction PSNR of uint8 NHWC images through encode -> decode."""
    vals = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255)
        vals.append(psnr(x, fs.decode_raw(fs.encode_raw(x)).cpu()))
    v = torch.cat(vals) if vals else torch.zeros(0)
    return {"psnr_mean": float(v.mean()) if len(v) else math.nan,
            "psnr_min": float(v.min()) if len(v) else math.nan, "n": int(len(v))}
