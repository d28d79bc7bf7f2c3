"""Downstream protocol (issue 11): flips happen in pixel space before encoding; test sets stay
outside every pretraining set."""
from __future__ import annotations

import os

import numpy as np
import torch

from downstream import sr
from conftest import DATA, small_cfg
from rsprune.cli import compose


def test_sr_trains_on_latents_of_flipped_pixels_not_flipped_latents(tmp_path):
    """The cached SR training latents of a flipped image are encode(flip(x)); flip(encode(x)) differs."""
    from downstream import finetune as ft
    from rsprune.autoencoders import build_first_stage

    cfg = small_cfg("downstream/sr", tmp_path, "backbone=none", "sr.max_train=6", "sr.max_test=2",
                    "train.max_steps=1", "train.cpu_threads=1", "train.flip=true")
    sr.run(cfg)
    fs = build_first_stage(cfg.autoencoder)
    hr, _, _, _ = sr.load_hr_lr(sr.image_list(cfg.sr.train, 6), 64, 4)
    cached = [np.load(p) for p in sorted((tmp_path / "cache" / "downstream").glob("latents-*.npy"))]
    plain = ft.encode_cached(fs, hr, ["check"], tmp_path / "c2")
    flipped_pixels = ft.encode_cached(fs, np.ascontiguousarray(hr[:, :, ::-1]), ["check-flip"], tmp_path / "c2")
    # The HR latents (the bicubic condition's latents are cached beside them): both orientations.
    train_z = next(z for z in cached if len(z) == 2 * len(hr) and np.allclose(z[:len(hr)], plain, atol=1e-4))
    np.testing.assert_allclose(train_z[len(hr):], flipped_pixels, atol=1e-4)
    flipped_latents = np.flip(train_z[:len(hr)], -1)
    assert np.abs(flipped_latents - flipped_pixels).mean() > 10 * 1e-4  # the shortcut is not the same latent
    # And the two are far apart as images: decoding the flipped latent loses several dB.
    x = torch.from_numpy(np.ascontiguousarray(hr[:, :, ::-1])).permute(0, 3, 1, 2).float() / 255
    err = [float(((fs.decode_raw(torch.from_numpy(z.copy())) - x) ** 2).mean()) for z in (flipped_pixels, flipped_latents)]
    assert 10 * np.log10(err[1] / err[0]) > 2


def test_dubai_mirrors_flip_image_and_mask_together(tmp_path):
    from downstream import dubai

    tiles = tmp_path / "dubai"
    tiles.mkdir()
    (tiles / "Tile_2").symlink_to(DATA / "dubai_seg" / "Tile_2", target_is_directory=True)
    (tiles / "Tile_3").symlink_to(DATA / "dubai_seg" / "Tile_3", target_is_directory=True)
    train, _, _ = dubai.split_crops(tiles, ["Tile_3"], 128, 128, 64)
    m = dubai.with_mirrors(train)
    n = len(train)
    assert len(m) == 2 * n and m.source[n].endswith(":flip")
    np.testing.assert_array_equal(m.images[n:], train.images[:, :, ::-1])
    np.testing.assert_array_equal(m.labels[n:], train.labels[:, :, ::-1])


def test_downstream_test_sets_are_outside_every_default_pretraining_set(tmp_path):
    """As the configs compose: SR test images, the generative test split, the scene reference and
    every command's default corpus are pairwise disjoint; Dubai test tiles share nothing with training tiles."""
    from downstream import dubai
    from rsprune.split import paths

    over = [f"data.root={DATA}", f"data.split.dir={tmp_path}"]
    train_data = compose("train", over).data
    sr_cfg = compose("downstream/sr", over)
    sets = {"corpus": paths(train_data.corpus), "reference": paths(train_data.reference),
            "test": paths(train_data.test), "sr_test": sr.image_list(sr_cfg.sr.test, None)}
    for name in ("prune", "downstream/sr", "downstream/semantic_synthesis"):  # every default corpus is that one
        assert paths(compose(name, over).data.corpus) == sets["corpus"], name
    real = {k: {os.path.realpath(p) for p in v} for k, v in sets.items()}
    for a in real:
        for b in real:
            assert a == b or not real[a] & real[b], f"{a} and {b} share images"
    assert len(real["sr_test"]) == 1800 and len(real["test"]) >= 1500
    ss = compose("downstream/semantic_synthesis", over).dubai
    pairs = dubai.find_pairs(ss.root)
    held = {str(img) for t, img, _ in pairs if t in ss.test_tiles}
    trained = {str(img) for t, img, _ in pairs if t not in ss.test_tiles}
    assert held and trained and not held & trained
