"""A small segmentation network, the judge of semantic synthesis.

Trained here on the real training crops only (cross-entropy, unlabeled pixels ignored), then
applied to generated images: if a generated image follows its input mask, the network finds the
mask's classes again (mIoU against the input mask). Its accuracy on real test crops is reported
beside, as the ceiling that number is read against. The weights are cached by (data, config),
so every backbone of a comparison is judged by the same network.

`fit` is a loop of its own, not train/engine.py's: a classifier's cross-entropy fitted once per
(data, config) and cached, with no noise schedule, EMA, sample grids or resume to share.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsprune.cache import atomic_path, stable_hash
from rsprune.device import resolve as resolve_device
from rsprune.fingerprint import array_digest

log = logging.getLogger(__name__)


def block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                         nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """A 3-level U-Net: enough receptive field for land cover, small enough to train on CPU."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.enc = nn.ModuleList([block(3, w), block(w, 2 * w), block(2 * w, 4 * w)])
        self.dec = nn.ModuleList([block(6 * w, 2 * w), block(3 * w, w)])
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for dec, skip in zip(self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)


def _input(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def fit(images: np.ndarray, labels: np.ndarray, cfg, num_classes: int, ignore: int, seed: int = 0) -> SegNet:
    """Train on uint8 crops (N, R, R, 3) with class ids (N, R, R); flips as augmentation."""
    dev = resolve_device()
    torch.manual_seed(seed)
    net = SegNet(num_classes, int(cfg.width)).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg.lr), weight_decay=1e-4)
    steps = int(cfg.steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(cfg.lr), total_steps=max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = _input(images), torch.from_numpy(labels.astype(np.int64))
    for step in range(steps):
        idx = torch.randint(len(x_all), (min(int(cfg.batch_size), len(x_all)),), generator=g)
        x, y = x_all[idx], y_all[idx]
        if torch.rand(1, generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand(1, generator=g) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        loss = F.cross_entropy(net(x.to(dev)), y.to(dev), ignore_index=ignore)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0:
            log.info("segnet step %d loss %.4f", step, loss.item())
    return net.eval()


@torch.no_grad()
def predict(net: SegNet, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class ids (N, R, R) uint8 for uint8 images (N, R, R, 3)."""
    dev = next(net.parameters()).device
    out = [net(_input(images[i:i + batch_size]).to(dev)).argmax(1).cpu().numpy().astype(np.uint8)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(images.shape[:3], np.uint8)


def cached(images: np.ndarray, labels: np.ndarray, cfg, data_key: str, cache_dir, num_classes: int,
           ignore: int, seed: int = 0) -> tuple[SegNet, Path]:
    """The segmentation network for these training crops and config: loaded if cached, else fitted.
    The key holds the crops' bytes: tiles overwritten in place train another network."""
    key = stable_hash(data_key, array_digest(images, labels), dict(cfg), num_classes, ignore, seed, n=16)
    path = Path(cache_dir) / "downstream" / f"segnet-{key}.pt"
    if path.is_file():
        net = SegNet(num_classes, int(cfg.width))
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        dev = resolve_device()
        return net.to(dev).eval(), path
    net = fit(images, labels, cfg, num_classes, ignore, seed)
    with atomic_path(path) as tmp:
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, tmp)
    return net, path
