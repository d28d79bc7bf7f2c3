"""Embedding throughput of the default encoder: eager PyTorch against the fast paths.

`python benchmarks/embed_speed.py [--n 512] [--compile]`

Model-only rows time the encoder on images decoded beforehand (the network's own rate);
end-to-end rows time `embed_paths` (decode + resize in DataLoader workers + network), what
the embed stage really does. Every row's embeddings are compared image by image with eager
PyTorch (cosine), and the speedup is against eager in the same run.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchutil import DATA, table, write_section
from rsprune.cli import compose
from rsprune.encoders import build_encoder, embed_paths
from rsprune.imageio import list_images, load_rgb, resize


def sample_paths(n: int) -> list[str]:
    """n AID images spread evenly over the sorted list (so over all classes)."""
    root = DATA / "aid"
    rel = list_images(root)
    step = max(1, len(rel) // n)
    return [str(root / r) for r in rel[::step][:n]]


def encoder(**knobs):
    return build_encoder(compose("prune", [f"encoder.{k}={v}" for k, v in knobs.items()]).encoder)


def timed(fn) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(jobs: dict, rounds: int) -> dict:
    """Run every job once per round, round-robin, so that load from other jobs on a shared
    machine falls on all of them alike; returns name -> (median seconds, last output)."""
    times = {k: [] for k in jobs}
    outs = {}
    for r in range(rounds):
        for name, fn in jobs.items():
            dt, outs[name] = timed(fn)
            times[name].append(dt)
            print(f"round {r}: {name}: {dt:.2f} s", flush=True)
    return {k: (float(np.median(v)), outs[k]) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="images (AID, spread over classes)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median counts")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile here)")
    args = ap.parse_args()
    paths = sample_paths(args.n)
    images = np.stack([resize(load_rgb(p), 128) for p in paths])
    n = len(paths)
    print(f"{n} images, torch threads {torch.get_num_threads()}")

    variants = {"eager": (dict(backend="eager"), 64),
                "eager channels_last": (dict(backend="eager", channels_last=True), 64)}
    variants |= {f"onnx b{b}": (dict(backend="onnx"), b) for b in (32, 64, 128)}
    if args.compile:
        variants["compile"] = (dict(backend="compile"), 64)
    encs, setup = {}, {}
    for name, (knobs, batch) in variants.items():
        dt, encs[name] = timed(lambda: encoder(**knobs))
        setup[name] = dt + timed(lambda: encs[name](images[:batch]))[0]  # first call: export/compile/warm-up

    def model_job(name):
        enc, batch = encs[name], variants[name][1]
        return lambda: np.concatenate([enc(images[i:i + batch]) for i in range(0, n, batch)])

    got = interleaved({k: model_job(k) for k in variants}, args.rounds)
    ref = got["eager"][1]
    rows = [["model only", k, variants[k][1], "-", setup[k], n / t, got["eager"][0] / t,
             f"{(e * ref).sum(1).min():.7f}"] for k, (t, e) in got.items()]

    e2e = {"eager": (encs["eager"], 1), "onnx b64": (encs["onnx b64"], 0), "onnx b64 ": (encs["onnx b64"], 1)}
    got = interleaved({k: (lambda enc=enc, w=w: embed_paths(enc, paths, 64, w, progress=False))
                       for k, (enc, w) in e2e.items()}, args.rounds)
    rows += [["embed_paths (decode+model)", k.strip(), 64, e2e[k][1], float("nan"), n / t, got["eager"][0] / t,
              f"{(e * ref).sum(1).min():.7f}"] for k, (t, e) in got.items()]

    head = ["what", "backend", "batch", "decode workers", "setup s", "images/s", "x eager", "min cosine vs eager"]
    text = table(head, rows)
    print(text)
    body = (f"Default encoder `configs/encoder/efficientnet_lite0.yaml` (EfficientNet-Lite0, 128 px, pooled "
            f"features), {n} AID images, torch threads {torch.get_num_threads()}, ONNX Runtime threads = torch "
            f"threads. Rows of a block run interleaved, {args.rounds} rounds, median time. `setup s` = build + "
            f"first batch (ONNX export, compile). `x eager` is against the eager row of the same block (target "
            f">= 2x, min cosine >= 0.999 per image).\n\n{text}")
    write_section("embed_speed", "Embedding throughput", body)


if __name__ == "__main__":
    main()
