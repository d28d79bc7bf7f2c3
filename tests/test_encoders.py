"""Encoder registry: Hugging Face vision models from a local directory (tiny random configs built
here, nothing downloaded) and the offline EfficientNet-Lite default, on real images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import DATA
from prune.run import run
from rsprune.cli import UsageError, compose
from rsprune.encoders import build_encoder, embed_paths
from rsprune.imageio import list_images


def real_batch(n=8, size=32) -> tuple[list, np.ndarray]:
    from rsprune.imageio import load_rgb, resize

    paths = [DATA / "aid" / "Forest" / f for f in list_images(DATA / "aid" / "Forest")[:n // 2]]
    paths += [DATA / "aid" / "Port" / f for f in list_images(DATA / "aid" / "Port")[:n // 2]]
    return paths, np.stack([resize(load_rgb(p), size) for p in paths])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("name,dim", [("clip", 24), ("dinov2", 32)])
def test_hf_encoders_load_from_a_local_directory(name, dim, request):
    path = request.getfixturevalue(f"tiny_{name}")
    enc_cfg = compose("prune", [f"encoder={name}", f"encoder.model={path}", "encoder.resolution=32"]).encoder
    enc = build_encoder(enc_cfg)
    _, batch = real_batch()
    e = enc(batch)
    assert e.shape == (8, dim) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(enc(batch[:3]), e[:3], atol=1e-5)  # a frozen, batch-independent map
    assert not np.allclose(e[0], e[-1], atol=1e-3)  # different scenes, different embeddings


def test_missing_hf_model_is_a_usage_error(tmp_path):
    enc_cfg = compose("prune", ["encoder=clip", f"encoder.model={tmp_path / 'absent'}"]).encoder
    with pytest.raises(UsageError, match="not found locally"):
        build_encoder(enc_cfg)
    with pytest.raises(UsageError, match="unknown encoder family"):
        build_encoder(OmegaConf.create({"family": "resnet"}))


def test_pipeline_runs_on_a_local_hf_encoder(tiny_clip, small_corpus, small_reference, tmp_path):
    from conftest import shrunk_overrides

    cfg = compose("prune", shrunk_overrides(small_corpus, small_reference, tmp_path / "r", tmp_path / "c",
                                            "encoder=clip", f"encoder.model={tiny_clip}", "encoder.resolution=32"))
    s = run(cfg, progress=False)
    assert s["counts"]["selected"] == 36


def test_default_encoder_separates_scenes_on_real_images():
    enc = build_encoder(compose("prune").encoder)
    paths, _ = real_batch(16)
    e = embed_paths(enc, paths, 8, 0, progress=False)
    assert e.shape == (16, 1280)
    sim = e @ e.T
    within = (sim[:8, :8].sum() - 8) / 56 + (sim[8:, 8:].sum() - 8) / 56
    across = sim[:8, 8:].mean() * 2
    assert within > across + 0.1, (within / 2, across / 2)  # forests resemble forests more than ports
