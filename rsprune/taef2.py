"""TAEF2: a tiny convolutional autoencoder (32-channel latents at 1/8 resolution).

Built from the architecture facts in ../shared/models/taef2/README.md so that the published
float16 state dicts load with strict=True. Images are RGB in [0, 1]; the encoder returns raw
(unscaled) latents, the decoder returns RGB clamped to [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def conv(a: int, b: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, padding 1."""
    return nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """x -> 3 tanh(x / 3): keeps decoder inputs in a bounded range without a hard cut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block of three 3x3 convs; with `gn`, a pooled-context branch is added first."""

    def __init__(self, a: int, b: int, gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(a, b), nn.ReLU(), conv(b, b), nn.ReLU(), conv(b, b))
        self.skip = nn.Conv2d(a, b, 1, bias=False) if a != b else nn.Identity()
        # The mid-block variant mixes channels through a 4x wider 1x1 bottleneck before both paths.
        self.pool = (nn.Sequential(nn.Conv2d(a, 4 * a, 1, bias=False), nn.GroupNorm(4, 4 * a), nn.ReLU(),
                                   nn.Conv2d(4 * a, a, 1, bias=False)) if gn else None)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.out(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """Encoder indexed 0..14: stem, one block, then three (stride-2 conv, 3 blocks) stages."""
    c = width
    return nn.Sequential(
        conv(3, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c), Block(c, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c), Block(c, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c, gn=True), Block(c, c, gn=True), Block(c, c, gn=True),
        conv(c, latent_channels),
    )


def make_decoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """Decoder indexed 0..19: soft clamp, stem, gn blocks, then three (upsample, conv, blocks) stages."""
    c = width

    def up() -> nn.Upsample:
        return nn.Upsample(scale_factor=2, mode="nearest")

    return nn.Sequential(
        SoftClamp(), conv(latent_channels, c), nn.ReLU(),
        Block(c, c, gn=True), Block(c, c, gn=True), Block(c, c, gn=True),
        up(), conv(c, c, bias=False), Block(c, c), Block(c, c), Block(c, c),
        up(), conv(c, c, bias=False), Block(c, c), Block(c, c), Block(c, c),
        up(), conv(c, c, bias=False), Block(c, c),
        conv(c, 3),
    )


class TAEF2(nn.Module):
    """The pair of networks; `encode` and `decode` work on [0, 1] RGB and raw latents."""

    latent_channels = 32
    downscale = 8

    def __init__(self):
        super().__init__()
        self.encoder = make_encoder(self.latent_channels)
        self.decoder = make_decoder(self.latent_channels)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "TAEF2":
        """Load taef2_encoder.pth and taef2_decoder.pth from `path` (float32, eval mode)."""
        path = Path(path)
        files = [path / "taef2_encoder.pth", path / "taef2_decoder.pth"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"TAEF2 weights not found: {', '.join(missing)}")
        model = cls()
        model.encoder.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True), strict=True)
        model.decoder.load_state_dict(torch.load(files[1], map_location="cpu", weights_only=True), strict=True)
        return model.float().eval().requires_grad_(False)

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-1] % 8 or x01.shape[-2] % 8:
            raise ValueError(f"TAEF2 needs H and W multiples of 8, got {tuple(x01.shape[-2:])}")
        return self.encoder(x01)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).clamp(0, 1)
