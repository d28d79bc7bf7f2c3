"""Training throughput: train/main.py (accelerate, EMA, logging, hooks) vs a plain PyTorch loop.

Both train the same diffusers UNet2DModel with the same batch, noise scheduler, AdamW, gradient
clipping and EMA update on the same cached latents; the plain loop has nothing around it. Runs
alternate (plain, framework, plain, ...) so that load from other jobs hits both alike.

    python benchmarks/bench_train.py [--steps 60] [--repeats 3] [--threads 1] [key=value ...]

Extra key=value pairs are Hydra overrides of the training config (default: +experiment=cpu_small
on 256 AID images). Prints one JSON line and a markdown table row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def plain_loop(cfg, latents: np.ndarray, scale: float, shift: float, steps: int) -> float:
    """Images/s of a bare loop: the same model, batch, scheduler, optimizer, clipping and EMA."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    from omegaconf import OmegaConf

    kw = OmegaConf.to_container(cfg.unet, resolve=True)
    kw.pop("name")
    c, size = latents.shape[1], latents.shape[-1]
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=c, out_channels=c, **kw).train()
    sched = DDPMScheduler(num_train_timesteps=cfg.scheduler.num_train_timesteps,
                          beta_schedule=cfg.scheduler.beta_schedule, prediction_type=cfg.scheduler.prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema.decay, use_ema_warmup=True)
    bs = int(cfg.train.batch_size)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        x0 = (torch.from_numpy(latents[np.sort(rng.choice(len(latents), bs, replace=False))].astype("float32"))
              - shift) * scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,))
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    return steps * bs / (time.perf_counter() - t0)


def framework(overrides: list[str], run_root: Path, i: int, steps: int) -> float:
    """Images/s of train/main.py's loop (its own timer, which leaves out start-up and saving)."""
    from rsprune.cli import compose
    from train.main import run

    cfg = compose("train", overrides + [f"run_dir={run_root / f'fw{i}'}", f"train.max_steps={steps}",
                                        f"train.log_every={steps}", f"train.checkpoint_every={steps}",
                                        "train.sample_every=0", "wandb.mode=disabled"])
    return float(run(cfg)["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=256, help="AID images in the training subset")
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import DATA, TAEF2_DIR, aid_paths, write_kept

    from rsprune.cli import compose
    from train.main import _prepare_data

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    kept = write_kept(tmp, aid_paths(args.images))
    overrides = ["+experiment=cpu_small", f"data.subset={kept}", f"cache_dir={tmp / 'cache'}",
                 f"data.corpus=[{DATA / 'aid'}]", f"autoencoder.path={TAEF2_DIR}",
                 f"train.cpu_threads={args.threads}", *extra]
    cfg = compose("train", overrides + [f"run_dir={tmp / 'prep'}"])

    class _One:  # _prepare_data needs only these members of an Accelerator
        device, num_processes, is_main_process, is_local_main_process = torch.device("cpu"), 1, True, True

        @staticmethod
        def local_main_process_first():
            import contextlib
            return contextlib.nullcontext()

    fs, latents, _ = _prepare_data(cfg, _One(), tmp)  # encodes once; both loops then read the cache
    lat = np.asarray(latents)
    plain, fw = [], []
    for i in range(args.repeats):
        plain.append(plain_loop(cfg, lat, fs.scale, fs.shift, args.steps))
        fw.append(framework(overrides, tmp, i, args.steps))
    res = {"unet": cfg.unet.name, "batch": int(cfg.train.batch_size), "latent": list(lat.shape[1:]),
           "steps": args.steps, "threads": args.threads, "plain_img_s": [round(v, 1) for v in plain],
           "framework_img_s": [round(v, 1) for v in fw],
           "ratio_median": round(statistics.median(fw) / statistics.median(plain), 3)}
    print(json.dumps(res))
    print(f"| {res['unet']} | {res['batch']} | {'x'.join(map(str, res['latent']))} | "
          f"{statistics.median(plain):.1f} | {statistics.median(fw):.1f} | {res['ratio_median']:.3f} |")


if __name__ == "__main__":
    main()
