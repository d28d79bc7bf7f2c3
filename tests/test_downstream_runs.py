"""A few fine-tuning steps of each downstream command on real images, resume, reports, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from downstream import semantic_synthesis, sr
from eval import downstream_tables as report
from conftest import DATA, backbone_run, small_cfg
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
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4] and m4["train_steps"] == 4
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


def _tiles_once(tmp_path: Path) -> Path:
    root = tmp_path / "dubai"
    return root if root.is_dir() else _link_tiles(root, ["Tile_2", "Tile_3"])


COMMANDS = {  # command -> (run function, its shrunk options)
    "sr": (sr.run, lambda tmp: ["backbone=none", "sr.max_train=12", "sr.max_test=2"]),
    "semantic_synthesis": (semantic_synthesis.run, lambda tmp: [
        "backbone=none", f"dubai.root={_tiles_once(tmp)}", "dubai.crop=128", "dubai.stride=128",
        "dubai.test_tiles=[Tile_2]", "eval.max_test=2", "segnet.steps=1", "segnet.batch_size=2"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_resumed_fine_tune_equals_uninterrupted(tmp_path, command):
    """2 steps + the same command rerun to 4 gives bit for bit the weights of 4 steps at once
    (batches, flips, noise, optimizer, EMA all resume: train.engine, as in train/'s test)."""
    from safetensors.torch import load_file

    run, opts = COMMANDS[command]
    name = f"downstream/{command}"
    # decay_steps fixed: by default the cosine follows max_steps, which a longer rerun stretches.
    base = [*opts(tmp_path), "train.cpu_threads=1", "train.checkpoint_every=2", "eval.steps=1", "optim.decay_steps=4"]
    # The first run encodes the latents, the others read them from the cache: the same weights too.
    run(small_cfg(name, tmp_path, *base, f"run_dir={tmp_path / 'a'}", "train.max_steps=2"))
    run(small_cfg(name, tmp_path, *base, f"run_dir={tmp_path / 'a'}", "train.max_steps=4"))
    run(small_cfg(name, tmp_path, *base, f"run_dir={tmp_path / 'b'}", "train.max_steps=4"))
    ck = [tmp_path / r / "checkpoints" / "step_0000004" for r in ("a", "b")]
    for sub in ("unet", "unet_ema"):
        a, b = (load_file(str(c / sub / "diffusion_pytorch_model.safetensors")) for c in ck)
        assert all(torch.equal(a[k], b[k]) for k in b), f"{command}: {sub} differs after resume"
    a, b = (load_file(str(ck[0] / s / "diffusion_pytorch_model.safetensors")) for s in ("unet", "unet_ema"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # EMA != raw weights, so the EMA check means something
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_sr_table_tests_paired_per_image_differences_on_the_committed_records():
    from scipy import stats

    from eval.paired import fmt_p

    runs = report.run_metrics([str(REPO / "results" / "downstream" / "sr" / "*")], "sr")
    text = report.sr_table(runs)
    assert report.SR_TEST in text and "alpha = 0.05" in text
    per_image = {name: m["rows"]["sr"]["psnr_per_image"] for name, m in runs}
    scratch = per_image["scratch"]
    for name, m in runs:
        if name == "scratch":
            continue
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
        r = stats.ttest_rel(per_image[name], scratch)
        d = np.asarray(per_image[name]) - np.asarray(scratch)
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        cell = f"{d.mean():+.2f} ± {half:.2f} (p = {fmt_p(r.pvalue)})"
        assert (f"**{cell}**" if r.pvalue < 0.05 else cell) in row, row
    assert text.count("(p = ") == 2 * (len(runs) - 1) - 1  # vs scratch for every start, vs full for the others
