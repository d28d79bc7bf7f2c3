"""Probes of a training run that cost seconds: the held-out denoising loss and sample statistics.

- Held-out loss: the diffusion loss of the (EMA) model on the test split's latents (the whole
  split by default) at a fixed set of timesteps with fixed noise. The same latents, timesteps and
  noise for every run of a comparison, so two runs' values are paired: differences far below FD's
  sampling noise show. Each image's loss at each timestep is kept in RUN/heldout/ (train/heldout.py).
- Sample statistics: the std/mean (and per-channel std range) of sampled latents beside the
  data's, and the share of saturated decoded pixels beside the real images' share. A sampler
  that diverges (epsilon prediction at alpha_bar ~ 0: latent std 8.8 against 1.0) says so here.

The training loop calls `Probes.heldout(step, unet_ema)` at snapshot/checkpoint steps and
`Probes.samples(step, latents)` at sample steps; both return a dict for that step's metrics record.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from train import heldout as files

log = logging.getLogger(__name__)


def heldout_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """n evenly spaced timesteps, the centres of n equal bins of [0, T): 62, 187, ..., 937 for T=1000, n=8."""
    return [int((k + 0.5) * num_train_timesteps / n) for k in range(n)]


@torch.no_grad()
def heldout_losses(unet, scheduler, z0: torch.Tensor, timesteps: list[int], seed: int,
                   batch_size: int = 128) -> np.ndarray:
    """Diffusion loss (epsilon or v target, as trained) of `unet` on each scaled latent of `z0` at
    each timestep: float32 (n_images, n_timesteps).

    One noise tensor drawn from `seed` is used at every timestep, so the per-timestep values
    differ only by t, and a rerun (or another run on the same latents) sees identical inputs.
    """
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(int(seed)))
    out = np.empty((len(z0), len(timesteps)), np.float32)
    for j, t in enumerate(timesteps):
        for i in range(0, len(z0), batch_size):
            x0, eps = z0[i:i + batch_size], noise[i:i + batch_size]
            tt = torch.full((len(x0),), int(t), dtype=torch.long)
            xt = scheduler.add_noise(x0, eps, tt)
            target = scheduler.get_velocity(x0, eps, tt) if scheduler.config.prediction_type == "v_prediction" else eps
            pred = unet(xt.to(dev, dtype), tt.to(dev)).sample.float().cpu()
            out[i:i + len(x0), j] = ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    return out


def heldout_loss(unet, scheduler, z0: torch.Tensor, timesteps: list[int], seed: int,
                 batch_size: int = 128) -> dict:
    """Mean held-out loss over images and timesteps, and per timestep (the mean of heldout_losses)."""
    losses = heldout_losses(unet, scheduler, z0, timesteps, seed, batch_size)
    return _means(losses, timesteps)


def _means(losses: np.ndarray, timesteps: list[int]) -> dict:
    per_t = losses.astype(np.float64).mean(axis=0)
    return {"heldout_loss": float(per_t.mean()),
            "heldout_loss_t": {str(int(t)): float(v) for t, v in zip(timesteps, per_t)}}


def latent_stats(z: torch.Tensor, prefix: str) -> dict:
    """std, mean and the range of per-channel stds of latents (N, C, h, w)."""
    z = z.detach().float().cpu()
    ch = z.transpose(0, 1).flatten(1).std(dim=1)
    return {f"{prefix}_latent_std": float(z.std()), f"{prefix}_latent_mean": float(z.mean()),
            f"{prefix}_latent_channel_std_min": float(ch.min()), f"{prefix}_latent_channel_std_max": float(ch.max())}


def saturated_share(images: np.ndarray) -> float:
    """Share of uint8 pixel values (every channel of every pixel) at 0 or 255."""
    if images.size == 0:
        return float("nan")
    return float(((images == 0) | (images == 255)).mean())


class Probes:
    """The held-out loss and sample-statistics probes of one run, with the data's side computed once.

    `test_latents`: scaled latents of the test split (by default all of it); `test_images`: the
    same images as uint8 NHWC at the training resolution (their saturated share is the reference).
    With `run_dir` and `paths` (the test images in row order), every held-out probe also writes
    its per-image losses to RUN/heldout/ (train/heldout.py) and logs the class-balanced and
    worst-class loss; `root` (the data root) names the classes, `test_sha256` the split.
    """

    def __init__(self, scheduler, first_stage, test_latents: torch.Tensor, test_images: np.ndarray,
                 n_timesteps: int = 8, seed: int = 0, drift: float = 1.5, batch_size: int = 128,
                 run_dir=None, paths: list[str] | None = None, root: str | None = None,
                 test_sha256: str | None = None):
        self.scheduler, self.first_stage = scheduler, first_stage
        self.z0, self.seed, self.drift, self.batch_size = test_latents.float(), int(seed), float(drift), batch_size
        self.timesteps = heldout_timesteps(int(scheduler.config.num_train_timesteps), int(n_timesteps))
        self.data = latent_stats(self.z0, "data") | {"data_saturated": saturated_share(test_images)}
        self.run_dir, self.index = run_dir, None
        if paths is not None:
            if len(paths) != len(self.z0):
                raise ValueError(f"{len(paths)} held-out paths for {len(self.z0)} latents")
            self.index = files.make_index(paths, self.timesteps, self.seed, scheduler.config.prediction_type,
                                          root, test_sha256)
            if run_dir is not None:
                files.write_index(run_dir, self.index)

    def heldout(self, step: int, unet) -> dict:
        """Held-out loss of `unet` (the caller swaps in the EMA weights) on the fixed test latents."""
        was_training = unet.training
        unet.eval()
        losses = heldout_losses(unet, self.scheduler, self.z0, self.timesteps, self.seed, self.batch_size)
        unet.train(was_training)
        out = _means(losses, self.timesteps)
        if self.index is not None:
            out |= files.summary(losses, self.index["classes"])
            if self.run_dir is not None:
                files.save_step(self.run_dir, step, losses)
        log.info("step %d: held-out loss %.4f on %d test latents", step, out["heldout_loss"], len(self.z0))
        return out | {"heldout_n": int(len(self.z0))}

    def samples(self, step: int, latents: torch.Tensor, images: np.ndarray | None = None) -> dict:
        """Statistics of sampled (scaled) latents and of their decoded images, beside the data's.

        `images`: the decoded uint8 samples if the caller has them already (else decoded here).
        """
        if images is None:
            images = self.first_stage.decode_uint8(latents)
        out = latent_stats(latents, "sample") | {"sample_saturated": saturated_share(images)} | self.data
        ratio = out["sample_latent_std"] / max(out["data_latent_std"], 1e-12)
        out["sample_std_ratio"] = ratio
        if not 1 / self.drift <= ratio <= self.drift:
            log.warning("step %d: sampled latents have std %.3g against %.3g for the data (x%.2f, beyond the "
                        "x%.2f tolerance of eval.sample_drift): the sampler drifts off the data's scale",
                        step, out["sample_latent_std"], out["data_latent_std"], ratio, self.drift)
        return out
