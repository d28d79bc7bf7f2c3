"""Configs say each shared value once: the cache root and the evaluation feature live in
configs/project.yaml and every other config reads them through ${project:KEY}."""
from __future__ import annotations

from pathlib import Path

import pytest

from rsprune.cli import compose

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _spelled(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")
            and (".cache/rsprune" in line or "RSPRUNE_CACHE" in line.split("#")[0]
                 or line.split("#")[0].rstrip().endswith((" efficientnet_lite2", ": efficientnet_lite2")))]


def test_cache_root_and_eval_feature_are_written_once():
    found = {str(p.relative_to(CONFIGS)): _spelled(p.read_text()) for p in sorted(CONFIGS.rglob("*.yaml"))
             if p.name != "project.yaml" and p.parent.name != "encoder"}
    assert {k: v for k, v in found.items() if v} == {
        # a defaults-list choice cannot interpolate: the evaluation space as the encoder group
        "eval/subset_quality.yaml": ["  - /encoder@encoder: efficientnet_lite2   # the evaluation space: NOT the "
                                     "selection's encoder (lite0)"]}


@pytest.mark.parametrize("name, key, sub", [("prune", "cache_dir", ""), ("train", "cache_dir", ""),
                                            ("downstream/sr", "cache_dir", ""), ("eval/fid", "cache_dir", "/fid"),
                                            ("eval/convergence", "cache_dir", "/fid"), ("train", "data.split.dir", "/split")])
def test_every_config_follows_the_one_cache_root(monkeypatch, tmp_path, name, key, sub):
    monkeypatch.setenv("RSPRUNE_CACHE", str(tmp_path / "c"))
    from omegaconf import OmegaConf

    assert OmegaConf.select(compose(name), key) == f"{tmp_path / 'c'}{sub}"
    monkeypatch.delenv("RSPRUNE_CACHE")
    assert OmegaConf.select(compose(name), key) == f".cache/rsprune{sub}"


def test_every_evaluation_reads_the_one_feature():
    from omegaconf import OmegaConf

    want = OmegaConf.load(CONFIGS / "project.yaml").eval_feature
    for name, key in [("eval/fid", "feature"), ("eval/convergence", "feature"), ("train", "eval.fd_feature"),
                      ("downstream/sr", "eval.fd_feature"), ("downstream/semantic_synthesis", "eval.fd_feature")]:
        assert OmegaConf.select(compose(name), key) == want, name
    want_encoder = OmegaConf.to_container(compose("prune", [f"encoder={want}"]).encoder)
    assert OmegaConf.to_container(compose("eval/subset_quality").encoder) == want_encoder


def test_downstream_shares_one_base_and_one_run_folder_rule():
    from downstream import semantic_synthesis, sr

    a, b = compose("downstream/sr"), compose("downstream/semantic_synthesis")
    for key in ("backbone", "seed", "cache_dir", "train", "optim", "eval.steps", "eval.fd_feature", "unet"):
        from omegaconf import OmegaConf

        assert OmegaConf.select(a, key) == OmegaConf.select(b, key), key
    got = sr.resolve(compose("downstream/sr", ["backbone=/runs/full-s0", "backbone_step=7", "seed=2"])).run_dir
    assert got == "outputs/downstream/sr/full-s0-step7-latent-s2"
    assert semantic_synthesis.resolve(b).run_dir == "outputs/downstream/semantic_synthesis/scratch-s0"
    assert sr.resolve(compose("downstream/sr", ["run_dir=/x/y"])).run_dir == "/x/y"
