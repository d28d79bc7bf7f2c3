"""Shared pieces of the downstream tests: real data paths, shrunk configs, a tiny backbone run folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rsprune.cli import compose

DATA = Path(os.environ.get("RSPRUNE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
TAEF2 = (DATA / ".." / "models" / "taef2").resolve()

# CPU-test sizes: 64 px images, 8x8 latents, a two-level UNet, a handful of steps.
SMALL = ["unet=tiny", "resolution=64", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
         "train.log_every=1", "optim.warmup_steps=1", "eval.steps=2", "eval.batch_size=8",
         "eval.fd_feature=efficientnet_lite0", "eval.sheet_n=2"]


def small_cfg(name: str, tmp_path: Path, *extra: str):
    """The real downstream config, shrunk to CPU-test size, writing under tmp_path."""
    return compose(name, [f"data.root={DATA}", f"autoencoder.path={TAEF2}", f"cache_dir={tmp_path / 'cache'}",
                          f"run_dir={tmp_path / 'run'}", *SMALL, *extra])


def tiny_unet(seed: int = 0):
    """A tiny UNet2DModel on 32-channel 8x8 latents with every weight non-zero (diffusers zero-inits none
    of conv_in, but a test of 'unchanged output' must not pass because some layer outputs zeros)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=32, out_channels=32, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=16)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def backbone_run(root: Path, step: int = 3) -> Path:
    """A run folder in train/'s checkpoint layout (unet, unet_ema, scheduler, first_stage.json)."""
    from diffusers import DDPMScheduler

    from rsprune.autoencoders import build_first_stage
    from rsprune.cache import write_json

    ck = root / "checkpoints" / f"step_{step:07d}"
    unet = tiny_unet(1)
    unet.save_pretrained(ck / "unet")
    tiny_unet(2).save_pretrained(ck / "unet_ema")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(ck / "scheduler")
    fs = build_first_stage(compose("downstream/sr", [f"data.root={DATA}", f"autoencoder.path={TAEF2}"]).autoencoder)
    fs.scale, fs.shift = 1.2, 0.05
    write_json(ck / "first_stage.json", fs.describe())
    return root
