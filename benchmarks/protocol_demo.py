"""Before/after sample sheet and statistics of the generation-protocol demo (two cpu_small runs, same data/steps/seed).

    python benchmarks/protocol_demo.py BEFORE_RUN AFTER_RUN [--out results/protocol_samples.png] [--n 8]

BEFORE_RUN was trained by main at a4524ec (epsilon prediction, samples clipped to +-1 in latent
space), AFTER_RUN by this branch (v-prediction, no clipping). Both runs' latest EMA weights are
sampled here with the same noise (50 DDIM steps): the before run as main samples it (clipped) and
unclipped, the after run unclipped. Prints the sampled-latent std and the saturated-pixel share of
each beside the test images', as JSON; the sheet shows real test images and the three rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def sample(run_dir, n: int, clip: bool, spacing: str, step: int | None = None, steps: int = 50, seed: int = 1234):
    """(scaled latents, uint8 images) of a run's latest EMA weights; clip=True, leading = as main sampled."""
    from diffusers import DDIMScheduler

    from train.generate import load_backbone
    from rsprune.autoencoders import to_uint8

    unet, sched, fs, info = load_backbone(run_dir, step=step)
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=clip, timestep_spacing=spacing)
    ddim.set_timesteps(steps)
    x = torch.randn(n, *info["latent_shape"], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x, to_uint8(fs.decode(x)), fs


def real_images(run_dir, n: int):
    """n test-split images of the after run (its held-out sample) at the training resolution."""
    from omegaconf import OmegaConf

    from train import data as tdata

    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    paths = tdata.seeded_sample(tdata.test_paths(cfg.data), n)
    return tdata.load_images(paths, int(cfg.data.resolution))


def labelled_rows(rows: list[tuple[str, np.ndarray]], n: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    from rsprune.sheets import grid

    h = rows[0][1].shape[1]
    label_w = 230
    sheet = Image.new("RGB", (label_w + n * h, len(rows) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        pick = np.linspace(0, len(imgs) - 1, n).round().astype(int)  # spread over the (class-sorted) set
        sheet.paste(Image.fromarray(grid(imgs[pick], cols=n)), (label_w, r * h))
        draw.multiline_text((4, r * h + 4), label, fill="black")
    return sheet


def main() -> None:
    from train.probes import latent_stats, saturated_share

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--out", default="results/protocol_samples.png")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--n_stats", type=int, default=256)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of both runs (default: latest)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    real = real_images(a.after, a.n_stats)
    # The before run sampled as main does (leading timesteps, clipped), then the same without clipping.
    arms = {"before_clipped": (a.before, True, "leading"), "before_unclipped": (a.before, False, "leading"),
            "after": (a.after, False, "trailing")}
    stats, imgs = {"real": {"saturated": saturated_share(real), "n": len(real)}}, {}
    for name, (run, clip, spacing) in arms.items():
        z, im, _ = sample(run, a.n_stats, clip, spacing, a.step)
        imgs[name] = im
        stats[name] = {k.replace("s_latent", "latent"): v for k, v in latent_stats(z, "s").items()}
        stats[name]["saturated"] = saturated_share(im)
    print(json.dumps(stats, indent=1))
    rows = [("real test-split images", real),
            ("before (main a4524ec):\nepsilon, DDIM clipped to +-1", imgs["before_clipped"]),
            ("before, sampled unclipped:\nepsilon diverges at alpha_bar~0", imgs["before_unclipped"]),
            ("after (this branch):\nv-prediction, unclipped, trailing", imgs["after"])]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_rows(rows, a.n).quantize(256).save(a.out, optimize=True)  # a small file for git
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
