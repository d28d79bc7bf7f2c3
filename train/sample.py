"""Write N samples of a run's EMA weights to a folder: python train/sample.py run=RUN n=1000 out=DIR

One PNG per image (000000.png, ...) and `samples.json` (run, step, n, seed, sampler, steps),
written last: a folder with it is complete, and rerunning the same command keeps it. This is
the folder `eval/fid.py fake=DIR` takes. The sampler is train.generate's, the one every
evaluation uses.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from rsprune import layout
from rsprune.cache import atomic_path, read_json, write_json
from rsprune.cli import UsageError, main

INFO = "samples.json"


def out_dir(cfg, step: int) -> Path:
    if cfg.out:
        return Path(str(cfg.out))
    return Path(str(cfg.run)) / layout.GENERATED / f"{layout.step_name(step)}-n{int(cfg.n)}-s{int(cfg.seed)}"


def run(cfg: DictConfig) -> dict:
    from rsprune.device import resolve
    from train.generate import SAMPLERS, generate, load_backbone

    if not cfg.run:
        raise UsageError("run=RUN_DIR is required (a train/ run folder)")
    if not Path(str(cfg.run)).is_dir():
        raise UsageError(f"run folder {cfg.run} does not exist")
    if int(cfg.n) < 1:
        raise UsageError(f"n={cfg.n}: at least one image")
    if str(cfg.sampler) not in SAMPLERS:
        raise UsageError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    loaded = load_backbone(str(cfg.run), step=cfg.step, ema=True, device=resolve(cfg.device))
    step = int(loaded[3]["step"])
    out = out_dir(cfg, step)
    info = {"run": str(Path(str(cfg.run)).resolve()), "step": step, "weights": loaded[3]["weights"],
            "n": int(cfg.n), "seed": int(cfg.seed), "sampler": str(cfg.sampler), "steps": int(cfg.steps),
            "image_size": int(loaded[3]["image_size"])}
    if (out / INFO).is_file():
        if read_json(out / INFO) == info:
            print(f"[sample] {out} already holds these {info['n']} samples")
            return info | {"out": str(out)}
        raise UsageError(f"{out} holds other samples ({out / INFO}); choose another out=")
    print(f"[sample] {info['n']} images of {cfg.run} step {step} ({info['sampler']}, {info['steps']} steps) "
          f"-> {out}", flush=True)
    images = generate(loaded, info["n"], seed=info["seed"], steps=info["steps"], sampler=info["sampler"],
                      batch_size=int(cfg.batch_size), progress=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        with atomic_path(out / f"{i:06d}.png") as tmp:
            Image.fromarray(im).save(tmp, format="PNG")
    write_json(out / INFO, info)  # last: marks the folder complete
    return info | {"out": str(out)}


if __name__ == "__main__":
    main("sample", run, __doc__)
