"""First stages on real AID images: TAEF2 (strict load, reconstruction), kl_small (fit + cache), registry errors."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from conftest import TAEF2_DIR, aid_paths

from rsprune.autoencoders import build_first_stage, from_description, reconstruction_psnr
from rsprune.cli import UsageError
from rsprune.imageio import load_rgb, resize

SHA = {"taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
       "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, size: int, offset: int = 5) -> np.ndarray:
    return np.stack([resize(load_rgb(p), size) for p in aid_paths(n, offset=offset)])


def test_taef2_state_dicts_load_strict_and_match_the_readme():
    from rsprune.taef2 import TAEF2

    for name, sha in SHA.items():
        assert hashlib.sha256((TAEF2_DIR / name).read_bytes()).hexdigest() == sha
    m = TAEF2.from_dir(TAEF2_DIR)  # strict=True inside: any naming or shape mismatch raises
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_dec = sum(p.numel() for p in m.decoder.parameters())
    assert (n_enc, n_dec) == (1_338_528, 1_338_499)


def test_taef2_reconstructs_held_out_aid():
    fs = build_first_stage(OmegaConf.create({"kind": "taef2", "path": str(TAEF2_DIR)}))
    imgs = _images(12, 64)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    z = fs.encode_raw(x)
    assert z.shape == (12, 32, 8, 8)
    r = reconstruction_psnr(fs, imgs)
    assert r["n"] == 12 and r["psnr_mean"] > 24  # README: 28.5 dB mean at 64 px on 100 images
    # a scaled first stage is an exact affine of the raw one and survives describe/rebuild
    fs.scale, fs.shift = 1.25, 0.07
    again = from_description(fs.describe())
    torch.testing.assert_close(again.encode(x), (z - 0.07) * 1.25)


def test_kl_small_fits_once_then_reuses_the_cache(tmp_path):
    from train.first_stage import build_first_stage

    arch = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1, "norm_num_groups": 8, "mid_block_add_attention": False}
    cfg = OmegaConf.create({"kind": "kl_small", "max_steps": 0, "lr": 1e-3, "kl_weight": 1e-6, "batch_size": 4,
                            "seed": 0, "arch": arch})
    imgs = _images(8, 32)
    calls = []

    def images_fn():
        calls.append(1)
        return imgs

    with pytest.raises(UsageError, match="no cached kl_small"):
        build_first_stage(cfg, images_fn, tmp_path, key_parts=("aid8",))
    cfg.max_steps = 3
    fitted = build_first_stage(cfg, images_fn, tmp_path, key_parts=("aid8",))
    assert fitted.downscale == 2 and fitted.latent_channels == 4 and calls == [1]
    cfg.max_steps = 0  # 0 = take the cached one, no fitting
    cached = build_first_stage(cfg, images_fn, tmp_path, key_parts=("aid8",))
    assert calls == [1] and cached.source == fitted.source
    x = torch.from_numpy(imgs[:2]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(cached.encode_raw(x), fitted.encode_raw(x))
    assert cached.decode(cached.encode(x)).shape == x.shape
    cfg.max_steps = 5  # not fitted yet, and no images to fit on (a downstream run): told where to fit it
    with pytest.raises(UsageError, match="fit it in a training run"):
        build_first_stage(cfg, None, tmp_path, key_parts=("aid8",))


def test_unknown_autoencoders_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown autoencoder kind"):
        build_first_stage(OmegaConf.create({"kind": "vqgan"}))
    with pytest.raises(UsageError, match="cannot load AutoencoderKL"):
        build_first_stage(OmegaConf.create({"kind": "diffusers", "id": str(tmp_path)}))


def test_latent_caches_are_verified_before_they_are_trusted(tmp_path, capsys):
    """A same-size damaged latent cache (training or downstream) is recomputed with a warning,
    never trained on (issue 13: every cache entry carries a checksum checked before use)."""
    from downstream.finetune import encode_cached
    from train.data import cached_latents

    fs = build_first_stage(OmegaConf.create({"kind": "taef2", "path": str(TAEF2_DIR)}))
    paths = aid_paths(6)
    z, _ = cached_latents(fs, paths, 32, tmp_path, 3, 0, show_progress=False)
    clean = np.array(z)
    entry = next((tmp_path / "latents").rglob("latents.npy"))
    raw = bytearray(entry.read_bytes())
    raw[-8:] = bytes(8)  # same size, last latent values zeroed
    entry.write_bytes(bytes(raw))
    again, _ = cached_latents(fs, paths, 32, tmp_path, 3, 0, show_progress=False)
    assert "does not match its checksum" in capsys.readouterr().err
    np.testing.assert_array_equal(np.array(again), clean)

    imgs = _images(4, 32)
    d = encode_cached(fs, imgs, "four", tmp_path)
    entry = next((tmp_path / "downstream").glob("latents-*.npy"))
    raw = bytearray(entry.read_bytes())
    raw[-8:] = bytes(8)
    entry.write_bytes(bytes(raw))
    np.testing.assert_array_equal(encode_cached(fs, imgs, "four", tmp_path), d)
    assert "does not match its checksum" in capsys.readouterr().err
