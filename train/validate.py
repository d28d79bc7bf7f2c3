"""The one place a training config is checked, as prune/validate.py checks a prune config: every
enumerated and numeric value, before any data is read or anything is written (split.json and
config.yaml included). A bad value is a UsageError (one line, exit code 2), never a late
traceback (`seed=-1`, `data.resolution=0`, `optim.lr=nan`).

A new key of configs/train.yaml or configs/trainer/ gets its row below. ENGINE_* are the sections
the downstream fine-tunes share (train.engine checks them for every caller).
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from rsprune.checks import check_number, check_table, get
from rsprune.errors import UsageError

INF = math.inf
SEED = (int, 0, 2 ** 32 - 1, True, True)  # numpy's and accelerate's set_seed range
BOOL = (True, False)

# The engine's sections (configs/trainer/default.yaml, configs/optim/): train/ and downstream/.
ENGINE_CHOICES = {
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.allow_tf32": BOOL,
    "train.ema.use_warmup": BOOL,
    "train.flip": BOOL,
    "optim.schedule": ("constant", "cosine"),
    "scheduler.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "scheduler.prediction_type": ("epsilon", "v_prediction"),
    "scheduler.timestep_spacing": ("trailing", "leading", "linspace"),
    "scheduler.rescale_betas_zero_snr": BOOL,
    "scheduler.allow_epsilon_low_snr": BOOL,
}
ENGINE_NUMBERS = {
    "seed": SEED,
    "train.max_steps": (int, 0, INF, True, False),
    "train.batch_size": (int, 1, INF, True, False),
    "train.grad_accum": (int, 1, INF, True, False),
    "train.max_grad_norm": (float, 0, INF, True, False),  # 0: no clipping
    "train.checkpoint_every": (int, 1, INF, True, False),
    "train.checkpoints_total_limit": (int, -INF, INF, True, False),  # 0 or less: keep all
    "train.log_every": (int, 1, INF, True, False),
    "train.sample_every": (int, 0, INF, True, False),
    "train.sample_n": (int, 1, INF, True, False),
    "train.sample_steps": (int, 1, INF, True, False),
    "train.sample_seed": SEED,
    "train.cpu_threads": (int, 1, INF, True, False),
    "train.ema.decay": (float, 0, 1, True, True),
    "train.ema.inv_gamma": (float, 0, INF, False, False),
    "train.ema.power": (float, 0, INF, False, False),
    "optim.lr": (float, 0, INF, False, False),
    "optim.weight_decay": (float, 0, INF, True, False),
    "optim.eps": (float, 0, INF, False, False),
    "optim.warmup_steps": (int, 0, INF, True, False),
    "optim.decay_steps": (int, 1, INF, True, False),
    "optim.min_lr_ratio": (float, 0, 1, True, True),
    "scheduler.num_train_timesteps": (int, 2, INF, True, False),
}
# train/main.py's own sections.
TRAIN_NUMBERS = {
    "data.resolution": (int, 8, INF, True, False),
    "data.scale_images": (int, 1, INF, True, False),
    "data.encode_batch_size": (int, 1, INF, True, False),
    "data.num_workers": (int, 0, INF, True, False),
    "eval.heldout_timesteps": (int, 1, INF, True, False),
    "eval.heldout_seed": SEED,
    "eval.sample_drift": (float, 1, INF, True, False),  # a factor: std off by more than it warns
    "eval.fd_every": (int, 0, INF, True, False),
    "eval.fd_samples": (int, 2, INF, True, False),  # a covariance needs 2 samples
    "eval.fd_steps": (int, 1, INF, True, False),
    "eval.fd_resolution": (int, 8, INF, True, False),
    "unet.layers_per_block": (int, 1, INF, True, False),
    "unet.attention_head_dim": (int, 1, INF, True, False),
    "unet.norm_num_groups": (int, 1, INF, True, False),
    "autoencoder.max_steps": (int, 0, INF, True, False),
    "autoencoder.lr": (float, 0, INF, False, False),
    "autoencoder.kl_weight": (float, 0, INF, True, False),
    "autoencoder.batch_size": (int, 1, INF, True, False),
    "autoencoder.seed": SEED,
    "autoencoder.fit_images": (int, 1, INF, True, False),
}
SAMPLE_SIZES = ("data.holdout", "eval.heldout_n")  # a positive count, or null / all


def _ints(key: str, value, lo: int) -> None:
    """A list of integers >= lo (null: skipped)."""
    if value is None:
        return
    if not OmegaConf.is_list(value) and not isinstance(value, (list, tuple)):
        raise UsageError(f"{key} must be a list of integers, e.g. [250,500]; got {value!r}")
    for i, v in enumerate(value):
        check_number(f"{key}[{i}]", v, int, lo, INF, True, False)


def check_engine(cfg) -> None:
    """The sections every train.engine caller shares (seed, train, optim, scheduler)."""
    check_table(cfg, ENGINE_CHOICES, ENGINE_NUMBERS)
    _ints("train.snapshot_steps", get(cfg, "train.snapshot_steps"), 1)
    betas = get(cfg, "optim.betas")
    if betas is not None:
        if len(list(betas)) != 2:
            raise UsageError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9,0.999]; got {list(betas)}")
        for i, b in enumerate(betas):
            check_number(f"optim.betas[{i}]", b, float, 0, 1, True, False)


def check_train(cfg) -> None:
    """Every value of a train/main.py config (keys absent from it are skipped)."""
    from train.data import sample_size

    check_engine(cfg)
    check_table(cfg, {}, TRAIN_NUMBERS)
    res = get(cfg, "data.resolution")
    if res is not None and res % 8:
        raise UsageError(f"data.resolution must be a multiple of 8 (the first stage's downscale); got {res!r}")
    for key in SAMPLE_SIZES:
        if get(cfg, key) is not None:
            sample_size(get(cfg, key), key)
    _ints("unet.block_out_channels", get(cfg, "unet.block_out_channels"), 1)
