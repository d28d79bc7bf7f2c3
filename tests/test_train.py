"""Training on real AID images: outputs, exact resume, the public generate API, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import aid_paths, tiny_overrides, write_kept

from rsprune.cli import UsageError, compose


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    kept = write_kept(root / "prune", aid_paths(24))
    return root, kept, root / "cache"


def _run(overrides):
    from train.main import run

    return run(compose("train", overrides))


def _unet_state(ckpt, sub):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(ckpt / sub).state_dict()


def test_resume_gives_the_same_weights_and_ema(setup_dir):
    """6 steps straight == 3 steps, then the same command with max_steps=6 (resumed), bit for bit."""
    root, kept, cache = setup_dir
    straight = _run(tiny_overrides(kept, root / "straight", cache))
    _run(tiny_overrides(kept, root / "resumed", cache, **{"train.max_steps": 3}))
    resumed = _run(tiny_overrides(kept, root / "resumed", cache))
    assert straight["step"] == resumed["step"] == 6
    for sub in ("unet", "unet_ema"):
        a = _unet_state(root / "straight/checkpoints/step_0000006", sub)
        b = _unet_state(root / "resumed/checkpoints/step_0000006", sub)
        for k in a:  # bit-identical: no RNG state is stored, batches and noise derive from the step
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after resume"
    # EMA really differs from the raw weights (otherwise the EMA comparison would prove nothing).
    ema, raw = (_unet_state(root / "resumed/checkpoints/step_0000006", s) for s in ("unet_ema", "unet"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    # metrics.jsonl of the resumed run: one line per step, no step logged twice.
    lines = [json.loads(ln) for ln in (root / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r or r["step"] == 0] == [0, 1, 2, 3, 4, 5, 6]
    # The probes at each checkpoint (3, 6) are logged once each too, resumed or not.
    assert [r["step"] for r in lines if "heldout_loss" in r] == [3, 6]
    assert [r["step"] for r in lines if "sample_latent_std" in r] == [3, 6]
    # ... and their per-image losses of the resumed run equal the uninterrupted run's, bit for bit.
    for step in (3, 6):
        a, b = (np.load(root / r / f"heldout/step_{step:07d}.npy") for r in ("straight", "resumed"))
        np.testing.assert_array_equal(a, b)


def test_run_folder_and_generate_api(setup_dir):
    from train.generate import generate, list_checkpoints, load_backbone

    root, kept, cache = setup_dir
    run_dir = root / "straight"
    if not (run_dir / "checkpoints").exists():
        _run(tiny_overrides(kept, run_dir, cache))
    assert (run_dir / "config.yaml").is_file()
    split = json.loads((run_dir / "split.json").read_text())  # the data sets it was given, hashed
    assert split["corpus"][0]["n"] == 10000 and len(split["test"][0]["sha256"]) == 64
    assert "subset_hash" in (run_dir / "config.yaml").read_text()  # the prune run it trained on
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    # total limit 2 by default, both kept; a third step rotates the oldest out (tested below).
    assert [s for s, _ in list_checkpoints(run_dir)] == [3, 6]
    ck = run_dir / "checkpoints/step_0000006"
    for name in ("unet", "unet_ema", "scheduler", "first_stage.json", "trainer_state.json", "optimizer.safetensors"):
        assert (ck / name).exists(), name
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["first_stage_psnr_mean"] > 20  # TAEF2 on held-out AID at 32 px

    unet, sched, fs, info = load_backbone(run_dir)
    assert info["step"] == 6 and info["weights"] == "unet_ema" and info["image_size"] == 32
    a = generate((unet, sched, fs, info), n=3, seed=7, steps=3, batch_size=2)
    b = generate(run_dir, n=3, seed=7, steps=3, device="cpu")
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a, b)  # fixed seed: same images whatever the batching
    # The first stage round-trips images and returns unit-scale latents.
    from rsprune.imageio import load_rgb, resize

    x = torch.from_numpy(np.stack([resize(load_rgb(p), 32) for p in aid_paths(4, offset=1)]))
    x = x.permute(0, 3, 1, 2).float() / 255
    z = fs.encode(x)
    assert z.shape == (4, 32, 4, 4) and 0.5 < float(z.std()) < 2.0
    assert float(((fs.decode(z) - x) ** 2).mean()) < 0.01


def test_checkpoint_rotation_and_partial_save(setup_dir):
    from train.generate import list_checkpoints

    root, kept, cache = setup_dir
    run_dir = root / "rotate"
    over = {"train.max_steps": 3, "train.checkpoint_every": 1, "train.sample_every": 0,
            "train.checkpoints_total_limit": 2}
    _run(tiny_overrides(kept, run_dir, cache, **over))
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 3]
    # A save killed midway leaves a temporary folder: ignored, then cleaned, and the run resumes from 3.
    partial = run_dir / "checkpoints/.tmp-step_0000004"
    (partial / "unet").mkdir(parents=True)
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 3]
    out = _run(tiny_overrides(kept, run_dir, cache, **{**over, "train.max_steps": 4}))
    assert out["step"] == 4 and not partial.exists()
    assert [s for s, _ in list_checkpoints(run_dir)] == [3, 4]


def test_load_backbone_without_checkpoint_is_a_usage_error(tmp_path):
    from train.generate import load_backbone

    with pytest.raises(UsageError, match="no checkpoint"):
        load_backbone(tmp_path)


def test_bad_subsets(setup_dir, tmp_path, caplog):
    root, kept, cache = setup_dir
    run_dir = tmp_path / "run"
    with pytest.raises(UsageError, match="does not exist"):
        _run(tiny_overrides(tmp_path / "nope.txt", run_dir, cache))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        _run(tiny_overrides(empty, run_dir, cache))
    with pytest.raises(UsageError, match="exceeds the 24 training images"):
        _run(tiny_overrides(kept, run_dir, cache, **{"train.batch_size": 25}))
    with pytest.raises(UsageError, match="TAEF2 weights not found"):
        _run(tiny_overrides(kept, run_dir, cache, **{"autoencoder.path": str(tmp_path)}))
    with pytest.raises(UsageError, match="cannot load AutoencoderKL"):
        _run(tiny_overrides(kept, run_dir, cache, autoencoder="sd_vae",
                                 **{"autoencoder.id": "no-such/vae", "autoencoder.path": None}))


def test_missing_and_undecodable_images_are_skipped_and_counted(setup_dir, tmp_path, caplog):
    from train.main import run

    root, kept, cache = setup_dir
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = aid_paths(8, offset=2) + [str(broken), str(tmp_path / "gone1.jpg"), str(tmp_path / "gone2.jpg")]
    sub = write_kept(tmp_path / "p", paths)
    over = tiny_overrides(sub, tmp_path / "run", cache, **{"train.max_steps": 1, "train.sample_every": 0})
    with caplog.at_level("WARNING"):
        out = run(compose("train", over))
    assert out["step"] == 1
    text = caplog.text
    assert "2 of 11 paths" in text and "gone1.jpg" in text
    assert "1 of 9 images could not be decoded" in text and "broken.jpg" in text
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert first["train_images"] == 8


def test_accumulation_bf16_v_prediction(setup_dir):
    """Gradient accumulation, bf16 autocast and v-prediction run and are recorded in the checkpoint."""
    from diffusers import DDPMScheduler

    root, kept, cache = setup_dir
    run_dir = root / "variants"
    out = _run(tiny_overrides(kept, run_dir, cache, **{
        "train.max_steps": 2, "train.grad_accum": 2, "train.mixed_precision": "bf16", "train.sample_every": 0,
        "scheduler.prediction_type": "v_prediction", "optim.schedule": "constant"}))
    assert out["step"] == 2 and np.isfinite(out["loss"])
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert lines[-1]["epoch"] == pytest.approx(2 * 2 * 4 / 24)  # steps x accumulation x batch / images
    sched = DDPMScheduler.from_pretrained(run_dir / "checkpoints/step_0000002/scheduler")
    assert sched.config.prediction_type == "v_prediction"


def test_fd_hook_logs_a_distance(setup_dir):
    root, kept, cache = setup_dir
    run_dir = root / "fd"
    _run(tiny_overrides(kept, run_dir, cache, **{"train.max_steps": 2, "train.sample_every": 0,
                                                 "eval.fd_every": 2, "eval.fd_samples": 4, "eval.fd_steps": 2}))
    fd = [json.loads(ln)["fd_smoke"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "fd_smoke" in ln]
    assert len(fd) == 1 and np.isfinite(fd[0]) and fd[0] >= 0


def test_training_with_a_fitted_kl_small(setup_dir):
    """autoencoder=kl_small fits once (cached), trains, and load_backbone rebuilds it from first_stage.json."""
    from train.generate import generate

    root, kept, cache = setup_dir
    run_dir = root / "kl"
    small = {"autoencoder": "kl_small", "autoencoder.path": None, "autoencoder.max_steps": 2,
             "autoencoder.arch.block_out_channels": "[16,32,32]", "autoencoder.arch.norm_num_groups": 8,
             "autoencoder.fit_images": 8, "train.max_steps": 1, "train.sample_every": 0}
    _run(tiny_overrides(kept, run_dir, cache, **small))
    desc = json.loads((run_dir / "checkpoints/step_0000001/first_stage.json").read_text())
    assert desc["kind"] == "kl_small" and desc["downscale"] == 4 and desc["latent_channels"] == 4
    assert len(list((cache / "autoencoders").glob("kl_small-*-s2"))) == 1
    assert generate(run_dir, n=2, seed=0, steps=2, device="cpu").shape == (2, 32, 32, 3)


def test_data_order_is_a_function_of_the_step():
    """Each epoch visits every latent once; ranks get disjoint slices; same step -> same batch."""
    from train.data import batch_indices

    n, bs, world = 10, 2, 2
    seen = np.concatenate([batch_indices(n, m, bs, r, world, seed=3) for m in range(5) for r in range(world)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # epoch 0 is a permutation
    assert sorted(seen[10:].tolist()) == list(range(10))  # and so is epoch 1 (micro-steps 3-4 straddle it)
    np.testing.assert_array_equal(batch_indices(n, 7, bs, 1, world, 3), batch_indices(n, 7, bs, 1, world, 3))
    assert not np.array_equal(seen[:10], seen[10:20])  # a new order each epoch
