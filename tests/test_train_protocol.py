"""The generation protocol of issue 11: no clipping, a well-conditioned parameterisation, trailing
timesteps, and the probes that say when samples drift off the data's scale."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsprune.cli import UsageError, compose


def _scheduler(*overrides):
    from train.setup import build_noise_scheduler

    return build_noise_scheduler(compose("train", list(overrides)).scheduler)


class OracleDenoiser(torch.nn.Module):
    """Predicts the exact epsilon / v target for one known clean latent x0: a perfect model.

    Reverse diffusion with it must end at x0 itself, whatever x0's range, unless the sampler clips.
    """

    def __init__(self, x0: torch.Tensor, scheduler):
        super().__init__()
        self.x0, self.alpha_bar = x0, scheduler.alphas_cumprod
        self.pred = scheduler.config.prediction_type
        self.config = SimpleNamespace(in_channels=x0.shape[1], sample_size=x0.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device and dtype

    def forward(self, xt, t):
        a = self.alpha_bar[int(t)].double()
        eps = (xt.double() - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = eps if self.pred == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return SimpleNamespace(sample=out.float())


def test_default_scheduler_is_v_prediction_unclipped_trailing(tmp_path):
    from diffusers import DDPMScheduler

    from train.generate import make_sampler

    sched = _scheduler()
    assert sched.config.prediction_type == "v_prediction"
    sched.save_pretrained(tmp_path / "scheduler")  # what every checkpoint writes
    saved = DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    assert saved.config.clip_sample is False
    for name in ("ddim", "ddpm", "dpm"):
        s = make_sampler(saved, name)
        assert not s.config.get("clip_sample", False) and not s.config.get("thresholding", False), name
        s.set_timesteps(50)
        assert int(s.timesteps[0]) == 999, f"{name} starts at t={int(s.timesteps[0])}, not T-1 (trailing)"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_keeps_latents_beyond_unit_range(sampler):
    """A perfect model's samples come back as the latent it knows, values up to +-4 included
    (clip_sample=True cut every DDIM x0 estimate to +-1)."""
    from train.generate import sample_latents

    sched = _scheduler()
    x0 = torch.linspace(-4, 4, 2 * 4 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4, 4)
    z = sample_latents(OracleDenoiser(x0, sched), sched, n=2, seed=0, steps=20, sampler=sampler)
    assert z.abs().max() > 3.5
    torch.testing.assert_close(z.double(), x0, atol=2e-3, rtol=1e-3)


def test_epsilon_on_a_schedule_reaching_zero_alpha_bar_is_refused_or_warned(caplog):
    with pytest.raises(UsageError, match="allow_epsilon_low_snr"):
        _scheduler("scheduler.prediction_type=epsilon")
    with pytest.raises(UsageError, match="terminal alpha_bar"):
        _scheduler("scheduler.prediction_type=epsilon", "scheduler.beta_schedule=scaled_linear")
    with caplog.at_level(logging.WARNING):
        s = _scheduler("scheduler.prediction_type=epsilon", "scheduler.allow_epsilon_low_snr=true")
    assert s.config.prediction_type == "epsilon" and "samples may diverge" in caplog.text
    z = _scheduler("scheduler.rescale_betas_zero_snr=true")  # v-prediction takes exactly zero terminal SNR
    assert float(z.alphas_cumprod[-1]) < 1e-6
