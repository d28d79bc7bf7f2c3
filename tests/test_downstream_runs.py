"""A few fine-tuning steps of each downstream command on real images, resume, reports, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from downstream import semantic_synthesis, sr
from eval import downstream_tables as report
from downstream_fixtures import DATA, backbone_run, small_cfg
from rsprune.cli import UsageError

REPO = Path(__file__).resolve().parents[1]
SR_DATA = ["sr.max_train=12", "sr.max_test=6", "train.cpu_threads=1"]


def _link_tiles(dst: Path, names) -> Path:
    dst.mkdir()
    for name in names:
        (dst / name).symlink_to(DATA / "dubai_seg" / name, target_is_directory=True)
    return dst


def test_sr_from_backbone_trains_evaluates_and_resumes(tmp_path):
    bb = backbone_run(tmp_path / "bb")
    cfg = small_cfg("downstream/sr", tmp_path, f"backbone={bb}", *SR_DATA)
    m = sr.run(cfg)
    run = Path(cfg.run_dir)
    assert m["backbone"] == str(bb) and m["backbone_step"] == 3 and m["n_test"] == 6 and m["n_train"] == 12
    for row in ("sr", "bicubic", "autoencoder"):
        r = m["rows"][row]
        assert 5 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and r["fd"] >= 0
    assert (run / "samples.png").is_file() and (run / "checkpoints" / "step_0000002" / "unet_ema").is_dir()
    assert json.loads((run / "metrics.json").read_text())["config_key"] == m["config_key"]
    # Resume: a longer run continues from step 2 (the log gains steps 3 and 4 only).
    m4 = sr.run(small_cfg("downstream/sr", tmp_path, f"backbone={bb}", *SR_DATA, "train.max_steps=4"))
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and m4["train_steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    out = report.sr_section(OmegaConf.create({"report": {"runs": [str(run)], "results_dir": str(tmp_path / "res")}}))
    text = Path(out["path"]).read_text()
    assert "bicubic x4 (baseline)" in text and f"{m4['rows']['sr']['psnr']:.2f}" in text


def test_sr_from_scratch_with_pixel_condition(tmp_path):
    m = sr.run(small_cfg("downstream/sr", tmp_path, "backbone=none", "sr.condition=pixels", *SR_DATA))
    assert m["backbone"] == "none" and m["condition"] == "pixels" and m["rows"]["sr"]["fd"] >= 0


def test_semantic_synthesis_few_steps_on_real_tiles(tmp_path):
    root = _link_tiles(tmp_path / "dubai", ["Tile_2", "Tile_3"])
    cfg = small_cfg("downstream/semantic_synthesis", tmp_path, "backbone=none", f"dubai.root={root}",
                    "dubai.crop=128", "dubai.stride=128", "dubai.test_tiles=[Tile_2]", "eval.max_test=6",
                    "segnet.steps=3", "segnet.batch_size=4", "train.cpu_threads=1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = semantic_synthesis.run(cfg)
    assert any("outside the 6 classes" in str(w.message) for w in caught)
    assert m["data"]["test_tiles"] == ["Tile_2"] and m["n_test"] == 6 and m["data"]["unknown_colour_pixels"] > 0
    for scores in (m["generated"], m["segnet_real"]):
        assert 0 <= scores["miou"] <= 1 and 0 <= scores["pixel_acc"] <= 1
    assert m["fd"] >= 0 and (Path(cfg.run_dir) / "samples.png").is_file()
    out = report.semantic_synthesis_section(
        OmegaConf.create({"report": {"runs": [cfg.run_dir], "results_dir": str(tmp_path / "res")}}))
    assert "segmentation net ceiling" in Path(out["path"]).read_text()


def test_backbone_without_checkpoint_is_a_usage_error(tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match="no checkpoint"):
        sr.run(small_cfg("downstream/sr", tmp_path, f"backbone={tmp_path / 'empty'}", *SR_DATA))


def test_cli_bad_backbone_and_too_large_crop_exit_2(tmp_path):
    base = [f"data.root={DATA}", f"cache_dir={tmp_path}/c", f"run_dir={tmp_path}/r"]
    for script, args, msg in [
        ("downstream/sr.py", [f"backbone={tmp_path}/missing"], "backbone folder not found"),
        ("downstream/semantic_synthesis.py", [f"dubai.root={_link_tiles(tmp_path / 'd', ['Tile_2', 'Tile_3'])}",
                                              "dubai.test_tiles=[Tile_2]", "dubai.crop=4000", "dubai.stride=4000",
                                              "unet=tiny"],
         "no train crops of 4000 px"),
    ]:
        p = subprocess.run([sys.executable, script, *base, *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last


def test_resumed_training_equals_uninterrupted(tmp_path):
    """2 steps + rerun to 4 gives the same weights as 4 steps at once (batches, noise, optimizer, EMA)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from downstream import finetune as ft
    from downstream.conditioning import widen_conv_in
    from downstream_fixtures import tiny_unet
    from rsprune.autoencoders import build_first_stage

    cfg = small_cfg("downstream/sr", tmp_path, "train.cpu_threads=1")
    fs = build_first_stage(cfg.autoencoder)
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(10, 32, 8, 8, generator=g), torch.randn(10, 32, 8, 8, generator=g)
    sched = DDPMScheduler(num_train_timesteps=1000)

    def train(run_dir, steps):
        cfg.train.max_steps = steps
        return ft.train(widen_conv_in(tiny_unet(), 32), sched, fs, z, c, cfg, run_dir)

    train(tmp_path / "a", 2)
    resumed = train(tmp_path / "a", 4)
    straight = train(tmp_path / "b", 4)
    for (k, v), w in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(v, w), k
    raw = UNet2DModel.from_pretrained(tmp_path / "a" / "checkpoints" / "step_0000004" / "unet").state_dict()
    assert not all(torch.equal(raw[k], v) for k, v in resumed.state_dict().items())  # EMA != raw weights
