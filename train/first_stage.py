"""The first stage of a training run: a pretrained autoencoder (rsprune.autoencoders), or
`kl_small`, a small AutoencoderKL fitted here on the training images and cached by content.

fit_kl is a loop of its own, not train/engine.py's: an autoencoder's reconstruction loss has no
noise schedule, EMA, sample grids or resume, and its result is a cache entry (a killed fit is
redone, never continued), so the diffusion engine's contract does not fit it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rsprune import autoencoders, layout
from rsprune.autoencoders import FirstStage
from rsprune.cache import follow_umask
from rsprune.cli import UsageError

log = logging.getLogger(__name__)


def build_first_stage(ae_cfg, images_fn=None, cache_dir: str | Path = ".cache/rsprune",
                      key_parts: tuple = ()) -> FirstStage:
    """The first stage named by the `autoencoder` config group, unscaled (scale 1, shift 0).

    `images_fn()` -> uint8 NHWC array of training images, only called to fit `kl_small`;
    `key_parts` identify those images in the cache key.
    """
    if ae_cfg.kind == "kl_small":
        return _fitted_kl(ae_cfg, images_fn, Path(cache_dir), key_parts)
    return autoencoders.build_first_stage(ae_cfg)


def _fitted_kl(ae_cfg, images_fn, cache_dir: Path, key_parts: tuple) -> FirstStage:
    """Fit (or reuse) a small AutoencoderKL; the cache folder is keyed by architecture, data, steps."""
    from omegaconf import OmegaConf

    from rsprune.cache import stable_hash

    arch = OmegaConf.to_container(ae_cfg.arch, resolve=True)
    base = f"kl_small-{stable_hash(arch, ae_cfg.lr, ae_cfg.kl_weight, *key_parts, n=12)}"
    root = layout.cache_path(cache_dir, layout.CACHE_FIRST_STAGE)
    steps = int(ae_cfg.max_steps)
    if steps == 0:
        found = sorted(root.glob(base + "-s*"), key=lambda p: int(p.name.rsplit("-s", 1)[1]))
        found = [p for p in found if (p / "config.json").is_file()]
        if not found:
            raise UsageError(f"no cached kl_small autoencoder under {root} for this data; "
                             "set autoencoder.max_steps=N to fit one")
        return _load(found[-1])
    out = root / f"{base}-s{steps}"
    if not (out / "config.json").is_file():
        if images_fn is None:
            raise UsageError(f"no cached kl_small autoencoder at {out}; fit it in a training run "
                             "(train/main.py autoencoder=kl_small autoencoder.max_steps=N)")
        model = fit_kl(arch, images_fn(), steps, float(ae_cfg.lr), float(ae_cfg.kl_weight),
                       int(ae_cfg.batch_size), int(ae_cfg.seed))
        _save_atomic(model, out)
    return _load(out)


def _load(folder: Path) -> FirstStage:
    return autoencoders.from_description({"kind": "kl_small", "source": {"id": str(folder.resolve())},
                                          "scale": 1.0, "shift": 0.0})


def _save_atomic(model, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        follow_umask(tmp, folder=True)  # mkdtemp makes 0700; a shared cache needs the umask's mode
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fit_kl(arch: dict, images: np.ndarray, steps: int, lr: float, kl_weight: float, batch_size: int,
           seed: int = 0):
    """Fit an AutoencoderKL on uint8 NHWC images: L1 + MSE reconstruction + a small KL term."""
    from diffusers import AutoencoderKL

    if len(images) == 0:
        raise UsageError("no images to fit the kl_small autoencoder on")
    torch.manual_seed(seed)
    model = AutoencoderKL(**arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=g)
        x = x_all[idx].float() / 127.5 - 1
        post = model.encode(x).latent_dist
        rec = model.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0:
            log.info("kl_small step %d loss %.4f", step, loss.item())
    return model.eval()
