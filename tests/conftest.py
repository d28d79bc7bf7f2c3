"""Shared fixtures and helpers: the REAL configs, shrunk, on small real corpora linked from ../shared/data.

Corpora are folders of symbolic links to real shared images (nothing is copied); one cache
folder per session is shared by the pipeline tests, so each image is embedded once. Test files
import the helpers from here (`from conftest import tiny_overrides`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rsprune.cli import compose

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSPRUNE_DATA", ROOT.parent / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"shared data not found at {DATA} (set RSPRUNE_DATA)")
        for item in items:
            item.add_marker(skip)


def link_images(dst: Path, src_root: Path, per_class: int, offset: int = 0) -> Path:
    """dst/<class>/<file> -> symlinks to `per_class` sorted images of each class folder."""
    for cls in sorted(p for p in src_root.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())[offset:offset + per_class]
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


@pytest.fixture
def one_thread():
    """One torch thread: on the shared 2-core machine it is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray cluster for one test module (the module skips itself without Ray)."""
    import ray
    from omegaconf import OmegaConf

    from prune.engine_ray import start_ray

    start_ray(OmegaConf.create({"address": None, "num_cpus": 2, "object_store_gb": 0.25}))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """240 real NWPU images: 20 of each of the 12 classes."""
    return link_images(tmp_path_factory.mktemp("corpus") / "nwpu", DATA / "nwpu12" / "train", 20)


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory) -> Path:
    """300 real AID images: 10 of each of the 30 scene classes."""
    return link_images(tmp_path_factory.mktemp("reference") / "aid", DATA / "aid", 10)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def shrunk_overrides(corpus, reference, run_dir, cache_dir, *extra) -> list[str]:
    """The real prune config, pointed at small corpora and test folders."""
    return [f"data.corpus=[{corpus}]", f"data.reference={reference}", f"run_dir={run_dir}",
            f"cache_dir={cache_dir}", "index.num_workers=0", "embed.shard_size=128",
            "clustering.min_sample=50", "clustering.cluster_size=10", "report.enabled=false", *extra]


@pytest.fixture
def prune_cfg(small_corpus, small_reference, session_cache, tmp_path):
    """Factory: compose the shrunk real config with extra overrides."""
    def make(*extra, run_dir=None, cache_dir=None):
        return compose("prune", shrunk_overrides(small_corpus, small_reference, run_dir or tmp_path / "run",
                                                 cache_dir or session_cache, *extra))
    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 6-step training run of the real train config, shrunk (tiny UNet, 32 px, 24 AID images):
    checkpoints at steps 3 and 6. Read it; train a copy to change it."""
    from train.main import run

    root = tmp_path_factory.mktemp("tiny-run")
    kept = write_kept(root / "prune", aid_paths(24))
    run(compose("train", tiny_overrides(kept, root / "run", root / "cache")))
    return root / "run"


# --- training: a few dozen real AID images and the train config, shrunk ---

TAEF2_DIR = DATA.parent / "models" / "taef2"
TAEF2 = TAEF2_DIR.resolve()


def aid_paths(n: int, offset: int = 0) -> list[str]:
    """n AID images spread over the classes (every k-th file of the sorted list)."""
    files = sorted(str(p) for p in (DATA / "aid").rglob("*.jpg"))
    step = max(len(files) // (n + offset), 1)
    return files[offset::step][:n]


def write_kept(folder: Path, paths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / "kept.txt"
    kept.write_text("".join(p + "\n" for p in paths))
    return kept


def heldout_list(kept: Path, n: int = 8) -> Path:
    """A list file of n real AID images outside `kept`: the run's test split (held-out set, probes)."""
    listed = kept / "kept.txt" if kept.is_dir() else kept
    taken = set(listed.read_text().split()) if listed.is_file() else set()
    path = Path(str(kept).rstrip("/") + "-test.txt")  # beside it: also for a kept.txt that does not exist
    path.write_text("".join(p + "\n" for p in [p for p in aid_paths(2 * n, offset=7) if p not in taken][:n]))
    return path


def tiny_overrides(kept: Path, run_dir: Path, cache: Path, **extra) -> list[str]:
    """cpu_small with a tiny UNet, 32 px images, a few steps; everything written under tmp."""
    over = {
        "data.subset": str(kept), "run_dir": str(run_dir), "cache_dir": str(cache),
        "data.resolution": 32, "data.holdout": 4, "data.num_workers": 0, "unet": "tiny",
        "data.test": str(heldout_list(kept)), "data.scale_images": 32, "eval.heldout_n": 8,
        "train.batch_size": 4, "train.max_steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.sample_every": 3, "train.sample_n": 4, "train.sample_steps": 3, "wandb.mode": "disabled",
        "optim.warmup_steps": 2, "train.cpu_threads": 1, "optim.decay_steps": 6,
        "data.corpus": f"[{DATA / 'aid'}]", "autoencoder.path": str(TAEF2_DIR),
    }
    over.update(extra)
    over = {k: v for k, v in over.items() if v is not None}  # None drops a key (other autoencoder kinds)
    return ["+experiment=cpu_small"] + [f"{k}={v}" for k, v in over.items()]


# --- downstream: shrunk configs and a tiny backbone run folder ---


# CPU-test sizes: 64 px images, 8x8 latents, a two-level UNet, a handful of steps.
SMALL = ["unet=tiny", "resolution=64", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
         "train.log_every=1", "optim.warmup_steps=1", "eval.steps=2", "eval.batch_size=8",
         "eval.fd_feature=efficientnet_lite0", "eval.sheet_n=2"]


def small_cfg(name: str, tmp_path: Path, *extra: str):
    """The real downstream config, shrunk to CPU-test size, writing under tmp_path."""
    return compose(name, [f"data.root={DATA}", f"autoencoder.path={TAEF2}", f"cache_dir={tmp_path / 'cache'}",
                          f"run_dir={tmp_path / 'run'}", *SMALL, *extra])


def tiny_unet(seed: int = 0):
    """A tiny UNet2DModel on 32-channel 8x8 latents with every weight non-zero (diffusers zero-inits none
    of conv_in, but a test of 'unchanged output' must not pass because some layer outputs zeros)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=32, out_channels=32, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=16)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def backbone_run(root: Path, step: int = 3) -> Path:
    """A run folder in train/'s checkpoint layout (unet, unet_ema, scheduler, first_stage.json)."""
    from diffusers import DDPMScheduler

    from rsprune.autoencoders import build_first_stage
    from rsprune.cache import write_json

    ck = root / "checkpoints" / f"step_{step:07d}"
    unet = tiny_unet(1)
    unet.save_pretrained(ck / "unet")
    tiny_unet(2).save_pretrained(ck / "unet_ema")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(ck / "scheduler")
    fs = build_first_stage(compose("downstream/sr", [f"data.root={DATA}", f"autoencoder.path={TAEF2}"]).autoencoder)
    fs.scale, fs.shift = 1.2, 0.05
    write_json(ck / "first_stage.json", fs.describe())
    return root
