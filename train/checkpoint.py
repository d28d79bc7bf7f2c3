"""Checkpoints that a kill cannot corrupt: written to a temporary folder, then renamed.

A checkpoint is `checkpoints/step_XXXXXXX/` with accelerate's full training state (model,
optimizer, LR scheduler, EMA, RNG states) and, for use without the training code, `unet/`,
`unet_ema/`, `scheduler/`, `first_stage.json` and `trainer_state.json`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rsprune.cache import read_json, write_json
from train.generate import list_checkpoints

TMP_PREFIX = ".tmp-"


def ckpt_name(step: int) -> str:
    return f"step_{step:07d}"


def clean_partial(run_dir) -> None:
    """Remove folders left by a save that was killed (main process only)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, run_dir, step: int, unet, ema, noise_scheduler, first_stage_desc: dict,
                    total_limit: int, extra_state: dict) -> Path:
    """Save on every process (accelerate writes per-process RNG states); publish on the main one."""
    root = Path(run_dir) / "checkpoints"
    final = root / ckpt_name(step)
    tmp = root / (TMP_PREFIX + ckpt_name(step))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        model.save_pretrained(tmp / "unet")
        with ema_weights(model, ema):
            model.save_pretrained(tmp / "unet_ema")
        noise_scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / "first_stage.json", first_stage_desc)
        write_json(tmp / "trainer_state.json", {"step": step, **extra_state})
        if final.exists():  # same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        rotate(run_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir, total_limit: int) -> None:
    """Keep the newest `total_limit` checkpoints (0 or less: keep all)."""
    if total_limit <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-total_limit]:
        shutil.rmtree(p, ignore_errors=True)


def resume(accelerator, run_dir) -> int:
    """Load the latest complete checkpoint into the prepared objects; return its step (0 if none)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return 0
    step, path = ckpts[-1]
    accelerator.load_state(str(path))
    return int(read_json(path / "trainer_state.json")["step"])


class ema_weights:
    """Context: the model holds the EMA weights inside, its own weights again after."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        self.ema.restore(self.model.parameters())
        return False
