"""The generation protocol of issue 11: no clipping, a well-conditioned parameterisation, trailing
timesteps, and the probes that say when samples drift off the data's scale."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsprune.cli import UsageError, compose


pytestmark = pytest.mark.usefixtures("one_thread")


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
        self.config = SimpleNamespace(in_channels=x0.shape[1], out_channels=x0.shape[1], sample_size=x0.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device and dtype

    def forward(self, xt, t):
        t = torch.as_tensor(t).reshape(-1).cpu()
        a = self.alpha_bar[t].double().reshape(-1, 1, 1, 1)
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


@pytest.fixture(scope="module")
def real_latents():
    """TAEF2 and the scaled latents of 16 real AID images at 32 px (unit std over them)."""
    from conftest import TAEF2_DIR, aid_paths

    from omegaconf import OmegaConf

    from rsprune.autoencoders import build_first_stage
    from rsprune.imageio import load_rgb, resize

    fs = build_first_stage(OmegaConf.create({"kind": "taef2", "path": str(TAEF2_DIR)}))
    images = np.stack([resize(load_rgb(p), 32) for p in aid_paths(16, offset=3)])
    raw = fs.encode_raw(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    fs.scale, fs.shift = 1 / float(raw.std()), float(raw.mean())
    return fs, (raw - fs.shift) * fs.scale, images


def test_heldout_loss_is_fixed_paired_and_zero_for_a_perfect_model(real_latents):
    from train.probes import Probes
    from train.setup import build_unet

    fs, z, images = real_latents
    sched = _scheduler()
    probes = Probes(sched, fs, z, images, n_timesteps=8, seed=0)
    assert probes.timesteps == [62, 187, 312, 437, 562, 687, 812, 937]
    unets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        unets.append(build_unet(compose("train", ["unet=tiny"]).unet, z.shape[1], z.shape[-1]))
    a, again, b = probes.heldout(10, unets[0]), probes.heldout(20, unets[0]), probes.heldout(10, unets[1])
    assert a["heldout_loss_t"] == again["heldout_loss_t"]  # same noise, same timesteps: identical
    assert a["heldout_loss"] != b["heldout_loss"] and len(a["heldout_loss_t"]) == 8 and a["heldout_n"] == 16
    assert a["heldout_loss"] == pytest.approx(np.mean(list(a["heldout_loss_t"].values())))
    # The oracle knows each latent: its v (and epsilon) predictions are exact, so the loss is ~0.
    for pred in ("v_prediction", "epsilon"):
        s = _scheduler(f"scheduler.prediction_type={pred}", "scheduler.allow_epsilon_low_snr=true")
        loss = Probes(s, fs, z, images).heldout(0, OracleDenoiser(z.double(), s))["heldout_loss"]
        assert loss < 1e-6, pred


def test_sample_statistics_flag_latents_off_the_data_scale(real_latents, caplog):
    from train.probes import Probes

    fs, z, images = real_latents
    probes = Probes(_scheduler(), fs, z, images, drift=1.5)
    with caplog.at_level(logging.WARNING):
        same = probes.samples(5, z.clone())
    assert same["sample_latent_std"] == pytest.approx(same["data_latent_std"]) and "drifts" not in caplog.text
    assert same["data_latent_std"] == pytest.approx(1.0, rel=1e-3)
    assert same["data_latent_channel_std_min"] < 1 < same["data_latent_channel_std_max"]
    # Real images decoded from their own latents saturate no more than the images themselves (+1 pt).
    assert same["sample_saturated"] <= same["data_saturated"] + 0.01
    with caplog.at_level(logging.WARNING):
        far = probes.samples(6, z * 8)  # what the epsilon sampler produced in issue 11
    assert far["sample_std_ratio"] == pytest.approx(8, rel=1e-3) and "drifts off the data's scale" in caplog.text
    assert far["sample_saturated"] > same["sample_saturated"] + 0.05


@pytest.mark.parametrize("config, experiment, channels", [
    ("configs/experiment/paper_gpu.yaml", "paper_gpu", 4), ("configs/unet/paper.yaml", "paper_gpu", 4),
    ("configs/experiment/cpu_small.yaml", "cpu_small", 32), ("configs/unet/small.yaml", "cpu_small", 32)])
def test_stated_parameter_counts_are_counted(config, experiment, channels):
    """The 'N M parameter' a config's header states is what instantiating it counts (within 3%),
    built on the meta device (no memory for the 100 M+ paper network)."""
    import re
    from pathlib import Path

    from accelerate import init_empty_weights

    from train.setup import build_unet, count_params

    header = (Path(__file__).resolve().parents[1] / config).read_text().split("\n", 3)[:3]
    stated = [float(m) for m in re.findall(r"(\d+(?:\.\d+)?) M param", " ".join(header))]
    cfg = compose("train", [f"+experiment={experiment}"])
    with init_empty_weights():
        unet = build_unet(cfg.unet, channels, cfg.data.resolution // 8)
    n = count_params(unet)
    assert next(unet.parameters()).device.type == "meta"
    assert stated and stated[0] * 1e6 == pytest.approx(n, rel=0.03), f"{config} states {stated} M, counted {n:,}"


def test_paper_gpu_composes_for_a_gpu():
    cfg = compose("train", ["+experiment=paper_gpu", "data.subset=full"])
    assert cfg.autoencoder.kind == "diffusers" and cfg.train.mixed_precision == "bf16"
    assert cfg.data.resolution == 256 and cfg.unet.name == "paper"


def _tiny_run(root, name, kept_paths, **extra):
    from conftest import tiny_overrides, write_kept

    from train.main import run

    kept = write_kept(root / f"prune-{name}", kept_paths)
    over = {"train.max_steps": 1, "train.sample_every": 0, "train.checkpoint_every": 1, **extra}
    run(compose("train", tiny_overrides(kept, root / name, root / "cache", **over)))
    return root / name


def test_subsets_of_one_corpus_share_its_latent_scale_and_the_test_split(tmp_path):
    """Two subsets train on the corpus's latent scale (not each its own std), recorded in
    first_stage.json; both record the same split.json and hold out test-split images only."""
    import json

    from conftest import aid_paths

    a = _tiny_run(tmp_path, "a", aid_paths(12))
    b = _tiny_run(tmp_path, "b", aid_paths(12, offset=2)[::-1][:6])
    fs = [json.loads((r / "checkpoints/step_0000001/first_stage.json").read_text()) for r in (a, b)]
    assert fs[0]["scale"] == fs[1]["scale"] and fs[0]["shift"] == fs[1]["shift"]
    assert fs[0]["scale_from"]["from"] == "corpus" and fs[0]["scale_from"]["n"] == 32
    step0 = json.loads((a / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["latent_scale"] == fs[0]["scale"]
    splits = [json.loads((r / "split.json").read_text()) for r in (a, b)]
    assert splits[0]["test"][0]["sha256"] == splits[1]["test"][0]["sha256"] and splits[0]["test"][0]["n"] == 8


def test_training_on_test_split_images_is_refused(tmp_path):
    from conftest import aid_paths, tiny_overrides, write_kept

    from train.main import run

    kept = write_kept(tmp_path / "prune", aid_paths(12))
    over = tiny_overrides(kept, tmp_path / "run", tmp_path / "cache", **{"data.test": str(kept)})
    with pytest.raises(UsageError, match="12 training images are in the test split"):
        run(compose("train", over))


def test_an_old_checkpoint_saved_with_clipping_loads_unclipped(tmp_path, caplog):
    """Runs saved before this fix carry diffusers' clip_sample=True (and epsilon): they load unclipped, with a warning."""
    from conftest import backbone_run

    from train.generate import load_backbone

    bb = backbone_run(tmp_path / "bb")
    assert '"clip_sample": true' in next((bb / "checkpoints").glob("step_*/scheduler/scheduler_config.json")).read_text()
    with caplog.at_level(logging.WARNING):
        _, sched, _, _ = load_backbone(bb)
    assert sched.config.clip_sample is False and "samples may diverge" in caplog.text
