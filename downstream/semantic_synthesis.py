"""Semantic image synthesis (land-cover mask -> image) fine-tuned from a foundation backbone.

    python downstream/semantic_synthesis.py backbone=RUN_DIR [dubai.crop=256] [train.max_steps=N] [run_dir=OUT]

The Dubai tiles are cut into crops and split by whole tile; the one-hot mask (6 classes,
averaged onto the latent grid) enters the UNet as extra input channels with zero-initialised
weights. Generated test images are scored by FD against the real test crops, and by the mIoU a
small segmentation network (trained here on the real training crops; its own mIoU on the real
test crops is reported beside) reaches on them against the input masks. Rerun to resume.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from downstream import dubai, segnet
from downstream import finetune as ft
from downstream.conditioning import mask_condition, widen_conv_in
from downstream.metrics import FDScorer, confusion, iou_scores
from rsprune import runlock
from rsprune.cache import stable_hash, write_json
from rsprune.cli import UsageError, main
from rsprune.device import resolve as resolve_device
from rsprune.sheets import column_sheet
from train.generate import sample_latents
from train.validate import check_engine

log = logging.getLogger(__name__)


def resolve(cfg: DictConfig) -> DictConfig:
    """Fill the run folder name from the backbone; check the crop options."""
    cfg = cfg.copy()
    d = cfg.dubai
    if int(d.crop) < 8 or int(d.stride) < 1:
        raise UsageError(f"dubai.crop={d.crop} / dubai.stride={d.stride}: crop must be >= 8 px, stride >= 1")
    if not cfg.run_dir:
        cfg.run_dir = ft.default_run_dir(cfg)
    return cfg


def load_crops(cfg, resolution: int):
    """(train, test, info) crops of the Dubai tiles at `resolution` px."""
    d = cfg.dubai
    return dubai.split_crops(d.root, list(d.test_tiles), int(d.crop), int(d.stride), resolution,
                             float(d.max_unlabeled))


def conditions(labels: np.ndarray, latent_size: int) -> torch.Tensor:
    return mask_condition(torch.from_numpy(dubai.one_hot(labels)), latent_size)


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
    fs.to(resolve_device())
    train, test, data_info = load_crops(cfg, res)
    fit = dubai.with_mirrors(train) if cfg.train.flip else train  # flips in pixels, before encoding
    ident = ["dubai", fit.source, res, int(cfg.dubai.crop)]
    raw = ft.encode_cached(fs, fit.images, ident, cfg.cache_dir)
    if info["backbone"] == "none":
        ft.fit_latent_scale(fs, raw)
    size = res // fs.downscale
    z, c = ft.scaled(fs, raw), conditions(fit.labels, size)
    net = widen_conv_in(unet, len(dubai.CLASSES))
    net = ft.train(net, scheduler, fs, z, c, cfg, run_dir)
    metrics = evaluate(cfg, net, scheduler, fs, train, test, size, stable_hash(ident))
    metrics |= {"task": "semantic_synthesis", "backbone": info["backbone"], "backbone_step": info["step"],
                "resolution": res, "crop": int(cfg.dubai.crop), "train_steps": int(cfg.train.max_steps),
                "data": data_info, "config_key": key, "seconds": round(time.time() - t0, 1)}
    write_json(run_dir / "metrics.json", metrics)
    log.info("semantic synthesis %s: fd %.2f miou %.3f (real %.3f)", run_dir, metrics["fd"],
             metrics["generated"]["miou"], metrics["segnet_real"]["miou"])
    return metrics


def evaluate(cfg, net, scheduler, fs, train, test, latent_size: int, data_key: str) -> dict:
    """FD of generated vs real test crops; segnet mIoU on generated (vs input masks) and on real."""
    ev = cfg.eval
    test_n = test if not ev.max_test else _head(test, int(ev.max_test))
    z = sample_latents(net.to(resolve_device()), scheduler, None, int(ev.seed), int(ev.steps), str(ev.sampler),
                       int(ev.batch_size), cond=conditions(test_n.labels, latent_size))
    fake = fs.decode_uint8(z)
    seg, seg_path = segnet.cached(train.images, train.labels, cfg.segnet, data_key, cfg.cache_dir,
                                  len(dubai.CLASSES), dubai.UNLABELED, int(cfg.seed))
    k, ign = len(dubai.CLASSES), dubai.UNLABELED
    real_scores = iou_scores(confusion(segnet.predict(seg, test_n.images), test_n.labels, k, ign), dubai.CLASSES)
    pred_fake = segnet.predict(seg, fake)
    gen_scores = iou_scores(confusion(pred_fake, test_n.labels, k, ign), dubai.CLASSES)
    fd = FDScorer(test_n.images, str(ev.fd_feature))
    column_sheet(Path(cfg.run_dir) / "samples.png",
                 [dubai.colourise(test_n.labels), fake, test_n.images, dubai.colourise(pred_fake)],
                 ["mask", "generated", "real", "segnet(gen)"], int(ev.sheet_n))
    return {"fd": fd(fake), "fd_feature": fd.name, "generated": gen_scores, "segnet_real": real_scores,
            "segnet": str(seg_path), "n_test": len(test_n), "n_train": len(train),
            "sampler": str(ev.sampler), "sampling_steps": int(ev.steps)}


def _head(crops: dubai.Crops, n: int) -> dubai.Crops:
    """An evenly spaced subset of n crops (covering every test tile, not just the first)."""
    if len(crops) <= n:
        return crops
    idx = np.linspace(0, len(crops) - 1, n).round().astype(int)
    return dubai.Crops(crops.images[idx], crops.labels[idx], [crops.source[i] for i in idx])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main("downstream/semantic_synthesis", run, __doc__)
