"""x4 super-resolution fine-tuned from a foundation backbone (or from scratch with backbone=none).

    python downstream/sr.py backbone=RUN_DIR [sr.condition=latent|pixels] [train.max_steps=N] [run_dir=OUT]

HR = the backbone's training resolution; LR = HR downsampled x4 (antialiased bicubic). The LR
image enters the UNet as extra input channels with zero-initialised weights. Held-out images are
scored by PSNR and SSIM against HR and by FD, beside the bicubic baseline and the autoencoder's
own round trip (the ceiling of any latent-space SR). Rerun the same command to resume.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from downstream import finetune as ft
from downstream.conditioning import condition_channels, pixels_condition, widen_conv_in, with_flips
from downstream.metrics import FDScorer, psnr_ssim, summary, to01
from rsprune import runlock
from rsprune.cache import write_json
from rsprune.cli import UsageError, main
from rsprune.device import resolve as resolve_device
from rsprune.imageio import UnreadableImage, list_images, load_sized, resize
from rsprune.manifest import read_kept
from rsprune.sheets import column_sheet
from train.generate import sample_latents
from train.validate import check_engine

log = logging.getLogger(__name__)


def image_list(src: str, limit: int | None) -> list[str]:
    """Paths from a folder tree or a list file (one path a line, e.g. a prune run's kept.txt).

    With `limit`, an evenly spaced subset of the sorted list, so every class folder stays in.
    """
    p = Path(str(src))
    if p.is_dir():
        paths = [str(p / r) for r in list_images(p)]
    elif p.is_file():
        paths = read_kept(p)  # a list file: the one reader of kept lists (relative lines, comments)
    else:
        raise UsageError(f"SR images not found: {src} (a folder or a list file)")
    if not paths:
        raise UsageError(f"no images in {src}")
    if limit and len(paths) > int(limit):
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, int(limit)).round().astype(int)]
    return paths


def load_hr_lr(paths, resolution: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(HR, LR, bicubic-upsampled LR) uint8 NHWC, and the number of unreadable files skipped."""
    if resolution % scale:
        raise UsageError(f"resolution {resolution} is not divisible by the SR scale {scale}")
    hr, lr, bic, bad = [], [], [], 0
    for p in paths:
        try:
            h = load_sized(p, resolution)
        except UnreadableImage as e:
            log.warning("skipped %s: %s", p, e)
            bad += 1
            continue
        low = resize(h, resolution // scale)
        hr.append(h), lr.append(low), bic.append(resize(low, resolution))
    if not hr:
        raise UsageError("no readable SR images")
    return np.stack(hr), np.stack(lr), np.stack(bic), bad


def conditions(cfg, fs, lr, bic, ident) -> torch.Tensor:
    """Condition maps on the latent grid for LR images (see downstream.conditioning)."""
    size = int(cfg.resolution) // fs.downscale
    if cfg.sr.condition == "latent":
        return ft.scaled(fs, ft.encode_cached(fs, bic, ["sr-bicubic", ident], cfg.cache_dir))
    return pixels_condition(to01(lr), size)


def resolve(cfg: DictConfig) -> DictConfig:
    """Fill the run folder name from the backbone and validate the task options."""
    cfg = cfg.copy()
    if cfg.sr.condition not in ("latent", "pixels"):
        raise UsageError(f"sr.condition={cfg.sr.condition!r}; expected latent | pixels")
    if not cfg.run_dir:
        cfg.run_dir = ft.default_run_dir(cfg, cfg.sr.condition)
    return cfg


def run(cfg: DictConfig) -> dict:
    cfg = resolve(cfg)
    check_engine(cfg)  # the trainer's values, before any image is read
    with runlock.hold(cfg.run_dir):  # one run per folder: a second one exits 2 naming this pid
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    t0 = time.time()
    run_dir = Path(cfg.run_dir)
    key, done = ft.finished(cfg)
    if done:
        return done
    unet, scheduler, fs, info = ft.load_start(cfg, cfg.resolution)
    res = int(info["image_size"])
    cfg.resolution = res
    fs.to(resolve_device())
    scale = int(cfg.sr.scale)
    train_paths = image_list(cfg.sr.train, cfg.sr.max_train)
    test_paths = image_list(cfg.sr.test, cfg.sr.max_test)
    hr, lr, bic, bad = load_hr_lr(train_paths, res, scale)
    n_train = len(hr)
    if cfg.train.flip:  # both orientations encoded from pixels: latents do not commute with flips
        hr, lr, bic = with_flips(hr, lr, bic)
    ident = [train_paths, res, scale] + (["flip"] if cfg.train.flip else [])
    raw = ft.encode_cached(fs, hr, ["sr-hr", ident], cfg.cache_dir)
    if info["backbone"] == "none":
        ft.fit_latent_scale(fs, raw)
    z, c = ft.scaled(fs, raw), conditions(cfg, fs, lr, bic, ident)
    net = widen_conv_in(unet, condition_channels(cfg.sr, fs))
    net = ft.train(net, scheduler, fs, z, c, cfg, run_dir)
    metrics = evaluate(cfg, net, scheduler, fs, test_paths, res, scale)
    metrics |= {"task": "sr", "backbone": info["backbone"], "backbone_step": info["step"],
                "resolution": res, "scale": scale, "condition": cfg.sr.condition,
                "train_steps": int(cfg.train.max_steps), "n_train": n_train, "unreadable_train": bad,
                "config_key": key, "seconds": round(time.time() - t0, 1)}
    write_json(run_dir / "metrics.json", metrics)
    log.info("SR %s: %s", run_dir, {k: metrics["rows"][k] for k in metrics["rows"]})
    return metrics


def evaluate(cfg, net, scheduler, fs, test_paths, res: int, scale: int) -> dict:
    """Rows sr / bicubic / autoencoder: PSNR, SSIM against HR and FD against the HR test set."""
    hr, lr, bic, bad = load_hr_lr(test_paths, res, scale)
    ev = cfg.eval
    cond = conditions(cfg, fs, lr, bic, [test_paths, res, scale])
    z = sample_latents(net.to(resolve_device()), scheduler, None, int(ev.seed), int(ev.steps), str(ev.sampler),
                       int(ev.batch_size), cond=cond)
    sr = fs.decode_uint8(z)
    ae = fs.decode_uint8(fs.encode(to01(hr).to(fs.device)))
    fd = FDScorer(hr, str(ev.fd_feature))
    rows = {}
    for name, images in (("sr", sr), ("bicubic", bic), ("autoencoder", ae)):
        q = psnr_ssim(images, hr)
        rows[name] = {"psnr": summary(q["psnr"])["mean"], "psnr_std": summary(q["psnr"])["std"],
                      "ssim": summary(q["ssim"])["mean"], "ssim_std": summary(q["ssim"])["std"],
                      "fd": fd(images),
                      # per test image, in test_paths order: runs on the same images compare paired
                      "psnr_per_image": [round(float(v), 4) for v in q["psnr"]],
                      "ssim_per_image": [round(float(v), 5) for v in q["ssim"]]}
    run_dir = Path(cfg.run_dir)
    column_sheet(run_dir / "samples.png", [lr, bic, sr, hr], ["LR x4", "bicubic", "SR", "HR"], int(ev.sheet_n))
    return {"rows": rows, "n_test": len(hr), "unreadable_test": bad, "fd_feature": fd.name,
            "sampler": str(ev.sampler), "sampling_steps": int(ev.steps)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main("downstream/sr", run, __doc__)
