"""Zero-initialised conditioning channels: at step 0 the widened UNet is the backbone."""
from __future__ import annotations

import pytest
import torch

from downstream import finetune as ft
from downstream.conditioning import mask_condition, pixels_condition, widen_conv_in
from conftest import backbone_run, small_cfg, tiny_unet


def _out(unet, x, t):
    with torch.no_grad():
        return unet(x, t).sample


def test_widened_unet_equals_backbone_at_step_0():
    unet = tiny_unet()
    wide = widen_conv_in(unet, 6)
    x, cond = torch.randn(3, 32, 8, 8), 5 * torch.randn(3, 6, 8, 8)
    t = torch.tensor([10, 500, 990])
    ref = _out(unet, x, t)
    got = _out(wide, torch.cat([x, cond], 1), t)
    assert wide.config.in_channels == 38 and wide.config.out_channels == 32
    assert torch.count_nonzero(wide.conv_in.weight[:, 32:]) == 0
    # Only summation order may differ between a 32- and a 38-channel convolution.
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max()), (got - ref).abs().max()
    assert ref.abs().mean() > 1e-3  # the comparison is of real outputs, not of zeros


def test_condition_channels_learn_after_one_step():
    """The zero weights are trainable: one gradient step makes them non-zero (the condition gets in)."""
    wide = widen_conv_in(tiny_unet(), 4).train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    x = torch.cat([torch.randn(2, 32, 8, 8), torch.randn(2, 4, 8, 8)], 1)
    wide(x, torch.tensor([5, 50])).sample.pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(wide.conv_in.weight[:, 32:]) > 0


def test_loaded_backbone_widened_is_unchanged(tmp_path):
    """Through the real loading path: train.generate.load_backbone (EMA weights) -> widen."""
    from train.generate import load_backbone

    run = backbone_run(tmp_path / "bb")
    cfg = small_cfg("downstream/semantic_synthesis", tmp_path, f"backbone={run}")
    unet, _, fs, info = ft.load_start(cfg, None)
    ref_unet = load_backbone(run)[0]
    assert info["weights"] == "unet_ema" and info["image_size"] == 64 and fs.scale == 1.2
    wide = widen_conv_in(unet, 6).eval()
    x, t = torch.randn(2, 32, 8, 8), torch.tensor([100, 700])
    ref = _out(ref_unet, x, t)
    got = _out(wide, torch.cat([x, mask_condition(torch.rand(2, 6, 64, 64), 8)], 1), t)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max())


def test_mask_condition_is_one_hot_inside_a_class_and_fractional_at_borders():
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 36:] = 3  # border inside the 5th latent cell column (cells are 8 px)
    onehot = torch.nn.functional.one_hot(labels, 6).permute(0, 3, 1, 2).float()
    c = mask_condition(onehot, 8)
    assert c.shape == (1, 6, 8, 8)
    assert torch.equal(c[0, :, 0, 0], torch.tensor([1., -1, -1, -1, -1, -1]))
    assert torch.equal(c[0, :, 0, 7], torch.tensor([-1., -1, -1, 1, -1, -1]))
    assert torch.allclose(c[0, [0, 3], 0, 4], torch.tensor([0., 0.]))  # half and half -> fractions 0.5 -> 0


def test_pixels_condition_keeps_every_lr_pixel():
    lr = torch.rand(2, 3, 16, 16)
    c = pixels_condition(lr, 8)
    assert c.shape == (2, 12, 8, 8)
    assert torch.allclose(torch.nn.functional.pixel_shuffle(c, 2), lr * 2 - 1)


def test_conditional_sampling_at_step_0_reproduces_backbone_samples():
    """Whole DDIM chains: the widened UNet with any condition gives the backbone's own samples
    (train.generate.sample_latents, same seed), so fine-tuning starts exactly from the backbone."""
    from diffusers import DDPMScheduler

    from train.generate import sample_latents

    unet, sched = tiny_unet(), DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ref = sample_latents(unet, sched, 3, seed=7, steps=3)
    got = sample_latents(widen_conv_in(unet, 6).eval(), sched, None, seed=7, steps=3, cond=torch.randn(3, 6, 8, 8))
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max())


def test_conditional_ddpm_sampling_repeats():
    """The one sampler draws a stochastic sampler's noise from (seed, item), with or without a
    condition: a rerun gives the same latents (the downstream sampler drew
    it from the global RNG, so two evaluations of one network differed)."""
    from diffusers import DDPMScheduler

    from train.generate import sample_latents

    net = widen_conv_in(tiny_unet(), 6).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    c = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    a = sample_latents(net, sched, None, seed=3, steps=3, sampler="ddpm", batch_size=4, cond=c)
    b = sample_latents(net, sched, None, seed=3, steps=3, sampler="ddpm", batch_size=4, cond=c)
    assert a.shape == (4, 32, 8, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="3 conditions for 4 samples"):
        sample_latents(net, sched, 4, seed=3, steps=3, cond=c[:3])
