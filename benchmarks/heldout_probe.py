"""Cost of the held-out loss probe per snapshot: the whole test split against the old 512-image sample.

    python benchmarks/heldout_probe.py [--threads 1] [--repeats 3] [key=value ...]

The probe (train/probes.py: every test latent at 8 timesteps, per-image losses written to
RUN/heldout/) on the default split's test images, with the +experiment=repro_cpu model (64 px,
TAEF2, unet=small) at random initialisation (the cost does not depend on the weights). In the
same process: the old default (a fixed sample of 512 test images) and the training step it
interrupts (forward, backward and AdamW on batch 32), so the probe is also given in training
steps and as a share of a 4,000-step repro_cpu run (probed at its snapshot and checkpoint steps).
Writes the `heldout_probe` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import table, write_section  # noqa: E402


def train_step_s(unet, sched, z: torch.Tensor, batch: int, steps: int) -> float:
    """Median seconds of one training step (the engine's diffusion loss, backward, AdamW)."""
    from train.setup import diffusion_loss

    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet.train()
    times = []
    for k in range(steps + 1):
        gen = torch.Generator().manual_seed(k)
        x0 = z[torch.randint(0, len(z), (batch,), generator=gen)]
        t0 = time.perf_counter()
        diffusion_loss(unet, sched, x0, gen).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20)
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from train.first_stage import build_first_stage
    from rsprune.cli import compose
    from train import data as tdata
    from train.probes import Probes
    from train.setup import build_noise_scheduler, build_unet

    tmp = Path(tempfile.mkdtemp(prefix="bench_heldout_"))
    cfg = compose("train", ["+experiment=repro_cpu", f"run_dir={tmp / 'run'}", *extra])
    res = int(cfg.data.resolution)
    fs = build_first_stage(cfg.autoencoder)
    test = tdata.test_paths(cfg.data)
    t0 = time.perf_counter()
    fs.scale, fs.shift = 1.0, 0.0
    z, images, kept = tdata.probe_set(fs, test, res, cfg.cache_dir, int(cfg.data.encode_batch_size), 0)
    load_s = time.perf_counter() - t0
    fs.shift, fs.scale = float(z.mean()), 1 / float(z.std())  # unit-scale latents (the corpus's in a run)
    z = (z - fs.shift) * fs.scale
    sched = build_noise_scheduler(cfg.scheduler)
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, z.shape[1], z.shape[-1])
    rows, probe_s = [], {}
    sample = tdata.seeded_sample(kept, 512)
    pick = np.flatnonzero(np.isin(np.asarray(kept), sample))
    for name, idx in (("fixed sample (old default)", pick), ("whole test split (default)", np.arange(len(kept)))):
        p = Probes(sched, fs, z[idx], images[idx], int(cfg.eval.heldout_timesteps), 0,
                   run_dir=tmp / name.split()[0], paths=[kept[i] for i in idx])
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            p.heldout(r, unet)
            times.append(time.perf_counter() - t0)
        probe_s[name] = statistics.median(times)
        rows.append([name, len(idx), len(p.timesteps), probe_s[name], len(idx) * len(p.timesteps) / probe_s[name]])
    step_s = train_step_s(unet, sched, z, int(cfg.train.batch_size), args.train_steps)
    steps = 4000
    probed = sorted({int(s) for s in cfg.train.snapshot_steps if int(s) <= steps}
                    | set(range(int(cfg.train.checkpoint_every), steps + 1, int(cfg.train.checkpoint_every))))
    for row, name in zip(rows, probe_s):
        row += [probe_s[name] / step_s, len(probed) * probe_s[name] / (steps * step_s) * 100]
    whole, old = probe_s["whole test split (default)"], probe_s["fixed sample (old default)"]
    body = (f"Default split's test images ({len(kept)} readable of {len(test)}), 64 px TAEF2 latents "
            f"{'x'.join(map(str, z.shape[1:]))}, `unet={cfg.unet.name}` (random init), probe batch 128, "
            f"{len(p.timesteps)} timesteps, {args.threads} torch thread(s); median of {args.repeats} probes, "
            f"each writing its per-image .npy. Loading the test set once (latent cache, then decoding the "
            f"images for the saturation reference): {load_s:.1f} s. Training step (batch "
            f"{cfg.train.batch_size}, forward + backward + AdamW, median of {args.train_steps}): {step_s:.3f} s. "
            f"`% of run`: probe time over a {steps}-step run probed at its {len(probed)} snapshot/checkpoint "
            f"steps ({', '.join(map(str, probed))}), against its training time.\n\n"
            + table(["probe set", "images", "timesteps", "s per probe", "image-timesteps/s", "training steps",
                     "% of run"], rows)
            + f"\n\nWhole split / old sample: x{whole / old:.2f} the time for x{len(kept) / len(pick):.2f} the images.")
    print(body)
    OmegaConf.save(cfg, tmp / "config.yaml")
    write_section("heldout_probe", "Held-out loss probe per snapshot: whole test split", body)


if __name__ == "__main__":
    main()
