"""Run-folder state that a kill cannot corrupt and a planted file cannot exploit.

A checkpoint `checkpoints/step_XXXXXXX/` (rsprune.layout) is written to a temporary folder by
the main process and renamed when complete. It holds only safetensors and JSON, so resuming
unpickles nothing. (accelerate 1.15's load_state unpickles registered objects'
`custom_checkpoint_*.pkl` with weights_only=False, and reads `optimizer.bin`, `scheduler.bin` and
`random_states_*.pkl` through torch.load's restricted unpickler: none of that is used here.)

    unet/ unet_ema/ scheduler/     diffusers save_pretrained folders (raw and EMA weights)
    first_stage.json               how to rebuild the autoencoder and the latent scale
    optimizer.safetensors          the optimizer's per-parameter tensors (AdamW moments, steps)
    trainer_state.json             step, LR schedule, EMA counters, optimizer groups, AMP scaler

No RNG state is stored: batches, noise and timesteps derive from (seed, step) (train.engine),
so a resumed run is bit-identical without one. A snapshot `snapshots/step_XXXXXXX/` is the light
EMA-only subset (unet_ema/, scheduler/, first_stage.json) that train.generate can load.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch

from rsprune import layout
from rsprune.cache import WriteError, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' weight file name in a save_pretrained folder
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
FIRST_STAGE = "first_stage.json"
# What resume reads: a checkpoint missing any of these (a copy cut short, a disk filled) is skipped.
RESUME_FILES = ("unet/config.json", f"unet/{WEIGHTS}", "unet_ema/config.json", f"unet_ema/{WEIGHTS}",
                "scheduler/scheduler_config.json", FIRST_STAGE, OPTIMIZER, TRAINER_STATE)
SNAPSHOT_FILES = ("unet_ema/config.json", f"unet_ema/{WEIGHTS}", "scheduler/scheduler_config.json", FIRST_STAGE)


def is_complete(path: Path, files=RESUME_FILES) -> bool:
    return all((path / f).is_file() for f in files)


def resumable(run_dir) -> list[tuple[int, Path]]:
    """Checkpoints holding every file resume reads, oldest first."""
    return [(s, p) for s, p in layout.step_folders(Path(run_dir) / layout.CHECKPOINTS) if is_complete(p)]


def clean_partial(run_dir) -> None:
    """Remove folders left by a save that was killed (main process only)."""
    for kind in (layout.CHECKPOINTS, layout.SNAPSHOTS):
        root = Path(run_dir) / kind
        if root.is_dir():
            for p in root.glob(layout.TMP_PREFIX + "*"):
                shutil.rmtree(p, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():  # same step saved again (e.g. a rerun that stops where it was)
        shutil.rmtree(final)
    tmp.rename(final)


@contextlib.contextmanager
def _writing(final: Path):
    """A temporary folder beside `final`, published when the block succeeds. A failed write (a full
    disk, a quota, a permission) is one WriteError line naming the step folder, and leaves no
    temporary behind: the previous checkpoints stay what resume reads."""
    from safetensors import SafetensorError

    tmp = final.parent / (layout.TMP_PREFIX + final.name)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _publish(tmp, final)
    except (OSError, SafetensorError, WriteError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise WriteError(f"cannot write {final}: {why}") from None


def _save_light(tmp: Path, model, ema, noise_scheduler, first_stage_desc: dict) -> None:
    with ema_weights(model, ema):
        model.save_pretrained(tmp / "unet_ema")
    noise_scheduler.save_pretrained(tmp / "scheduler")
    write_json(tmp / FIRST_STAGE, first_stage_desc)


def save_snapshot(run_dir, step: int, model, ema, noise_scheduler, first_stage_desc: dict) -> Path:
    """EMA weights only, never rotated: the points a convergence curve scores (main process)."""
    final = layout.snapshot_dir(run_dir, step)
    with _writing(final) as tmp:
        _save_light(tmp, model, ema, noise_scheduler, first_stage_desc)
    return final


def save_checkpoint(run_dir, step: int, model, ema, optimizer, lr_scheduler, noise_scheduler,
                    first_stage_desc: dict, extra_state: dict, scaler=None) -> Path:
    """A full resumable state of the unwrapped `model` (main process; the caller rotates)."""
    from safetensors.torch import save_file

    final = layout.checkpoint_dir(run_dir, step)
    with _writing(final) as tmp:
        model.save_pretrained(tmp / "unet")
        _save_light(tmp, model, ema, noise_scheduler, first_stage_desc)
        tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER))
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        state = {"step": step, **extra_state, "lr_scheduler": lr_scheduler.state_dict(), "ema": ema_meta,
                 "optimizer": opt_meta, "scaler": scaler.state_dict() if scaler is not None else None}
        write_json(tmp / TRAINER_STATE, state)  # written last: the folder is complete once it is there
    return final


def rotate(run_dir, total_limit: int) -> None:
    """Keep the newest `total_limit` checkpoints (0 or less: keep all); snapshots are never rotated."""
    if total_limit <= 0:
        return
    for _, p in layout.step_folders(Path(run_dir) / layout.CHECKPOINTS)[:-total_limit]:
        shutil.rmtree(p, ignore_errors=True)


def load_errors() -> tuple[type[BaseException], ...]:
    """What a damaged checkpoint or snapshot raises on load: a truncated or oversized safetensors
    file (SafetensorError), JSON of the wrong shape (TypeError, AttributeError, KeyError), I/O."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError)


def resume(run_dir, model, ema, optimizer, lr_scheduler, scaler=None) -> int:
    """Load the newest complete checkpoint into the (unwrapped) objects; its step, 0 if none.

    A newest folder that is incomplete or fails to load is passed over with a warning for the
    one before it: every tensor of every object is overwritten by a successful load.
    """
    for step, path in reversed(layout.step_folders(Path(run_dir) / layout.CHECKPOINTS)):
        if not is_complete(path):
            missing = [f for f in RESUME_FILES if not (path / f).is_file()]
            log.warning("checkpoint %s is incomplete (missing %s); trying an older one", path, ", ".join(missing))
            continue
        try:
            return _load(path, model, ema, optimizer, lr_scheduler, scaler)
        except load_errors() as e:
            log.warning("checkpoint %s does not load (%s); trying an older one", path, " ".join(str(e).split())[:200])
    return 0


def _load(path: Path, model, ema, optimizer, lr_scheduler, scaler) -> int:
    from safetensors.torch import load_file

    state = read_json(path / TRAINER_STATE)
    if not isinstance(state, dict):
        raise TypeError(f"{TRAINER_STATE} holds a {type(state).__name__}, not an object")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "unet" / WEIGHTS), device=str(device)))
    ema_sd = load_file(str(path / "unet_ema" / WEIGHTS))
    ema.load_state_dict({**state["ema"], "shadow_params": [ema_sd[n] for n, _ in model.named_parameters()]})
    ema.to(device)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / OPTIMIZER)), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """torch optimizer state -> ({"<param>.<name>": tensor}, JSON-able groups and scalars)."""
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    json.dumps(sd["param_groups"])  # fail at save time, not at resume time, if a group is not JSON
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


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
