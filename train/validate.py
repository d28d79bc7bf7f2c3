"""The one place a training config's values are checked, before anything is read or written (the
split record, the latent cache, the run folder): a bad value is one `error:` line, exit 2, not a
traceback after split.json was written. A new numeric or enumerated key gets its row here."""
from __future__ import annotations

import math

from rsprune.checks import check_table
from rsprune.errors import UsageError

INF = math.inf
CHOICES = {
    "optim.schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "scheduler.prediction_type": ("v_prediction", "epsilon"),
    "wandb.mode": ("offline", "online", "disabled"),
}
# key -> (int or float, lowest, highest, lowest allowed, highest allowed)
NUMBERS = {
    "seed": (int, 0, INF, True, False),
    "data.resolution": (int, 8, INF, True, False),
    "data.holdout": (int, 0, INF, True, False),
    "data.scale_images": (int, 1, INF, True, False),
    "data.encode_batch_size": (int, 1, INF, True, False),
    "data.num_workers": (int, 0, INF, True, False),
    "optim.lr": (float, 0, INF, False, False),
    "optim.weight_decay": (float, 0, INF, True, False),
    "optim.eps": (float, 0, INF, False, False),
    "optim.warmup_steps": (int, 0, INF, True, False),
    "optim.decay_steps": (int, 1, INF, True, False),
    "optim.min_lr_ratio": (float, 0, 1, True, True),
    "scheduler.num_train_timesteps": (int, 2, INF, True, False),
    "train.max_grad_norm": (float, 0, INF, True, False),
    "train.checkpoints_total_limit": (int, 0, INF, True, False),
    "train.sample_every": (int, 0, INF, True, False),
    "train.sample_n": (int, 0, INF, True, False),
    "train.sample_steps": (int, 1, INF, True, False),
    "train.sample_seed": (int, 0, INF, True, False),
    "train.ema.decay": (float, 0, 1, True, True),
    "train.cpu_threads": (int, 1, INF, True, False),
    "eval.heldout_timesteps": (int, 1, INF, True, False),
    "eval.heldout_seed": (int, 0, INF, True, False),
    "eval.fd_every": (int, 0, INF, True, False),
}


def check_values(cfg) -> None:
    """Every value of CHOICES and NUMBERS that this config holds (the step counts: engine.check_sizes)."""
    check_table(cfg, CHOICES, NUMBERS)
    if int(cfg.data.resolution) % 8:
        raise UsageError(f"data.resolution={cfg.data.resolution} must be a multiple of 8")
