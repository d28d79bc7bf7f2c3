"""Entropy stage (index pass) throughput against the raw decode rate of the same files (the floor).

`python benchmarks/entropy_speed.py [--n 5000] [--n512 1000] [--n2048 200] [--workers 0,2] [--rounds 5]`

The stage is prune.index.scan: read bytes once -> sha1 (exact duplicates) -> decode (a JPEG's
luma plane only) -> global and local entropy, in a DataLoader with workers. The floor is a
DataLoader doing only read + decode of the same files: the bytes read and PIL's full RGB
decode (Image.load), no array made, the least any reader of the pixels pays. Rows run
interleaved and the median of the rounds counts. Target: stage / floor >= 0.8.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchutil import DATA, table, write_section
from prune.index import scan
from rsprune.imageio import list_images


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(Path(self.paths[i]).read_bytes())) as im:
            im.load()
            return im.size


def _as_list(batch):
    return batch


def decode_only(paths, workers: int) -> int:
    loader = torch.utils.data.DataLoader(_Decode(paths), batch_size=64, num_workers=workers, collate_fn=_as_list)
    return sum(len(b) for b in loader)


def large_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[str]:
    """n JPEG tiles (quality 90) of `size` made from real AID images: bicubic upscale plus
    sensor-like noise, the sizes of the aerial tiles users bring."""
    srcs = [DATA / "aid" / p for p in list_images(DATA / "aid")]
    rng = np.random.default_rng(0)
    out = []
    for i, src in enumerate(srcs[::max(1, len(srcs) // n)][:n]):
        big = np.asarray(Image.open(src).convert("RGB").resize(size, Image.BICUBIC), np.float32)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        out.append(str(folder / f"tile_{size[0]}_{i:04d}.jpg"))
        Image.fromarray(big).save(out[-1], quality=90)
    return out


def measure(label: str, paths: list[str], workers: list[int], rounds: int, grid: int, max_side: int) -> list[list]:
    """Stage and floor timed interleaved over rounds; one table row per (pass, workers)."""
    for p in paths:  # warm the page cache: both sides then read from memory
        Path(p).read_bytes()
    jobs = {}
    for w in workers:
        jobs[("decode (floor)", w)] = lambda w=w: decode_only(paths, w)
        jobs[("entropy stage (scan)", w)] = lambda w=w: len(scan(paths, grid, max_side, w))
    times = {k: [] for k in jobs}
    for r in range(rounds):
        for k, fn in jobs.items():
            t = time.perf_counter()
            assert fn() == len(paths)
            times[k].append(time.perf_counter() - t)
            print(f"{label} round {r}: {k}: {times[k][-1]:.2f} s", flush=True)
    rows = []
    for (what, w), ts in times.items():
        floors = np.array(times[("decode (floor)", w)])
        med, floor = float(np.median(ts)), float(np.median(floors))
        per_round = floors / np.array(ts)  # the spread says how noisy the machine was
        rows.append([label, what, w, len(paths), med, len(paths) / med, floor / med,
                     f"{per_round.min():.2f}-{per_round.max():.2f}"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="files: AID and NWPU-12, spread over the sorted lists")
    ap.add_argument("--n512", type=int, default=1000, help="512 x 512 JPEG tiles made from AID (0: skip)")
    ap.add_argument("--n2048", type=int, default=200, help="2048 x 1536 JPEG tiles made from AID (0: skip)")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to time (config default 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--max-side", type=int, default=512)
    args = ap.parse_args()
    workers = [int(x) for x in args.workers.split(",")]
    files = [str(DATA / r / p) for r in ("aid", "nwpu12") for p in list_images(DATA / r)]
    paths = files[::max(1, len(files) // args.n)][:args.n]
    rows = measure("128 px real", paths, workers, args.rounds, args.grid, args.max_side)
    with tempfile.TemporaryDirectory() as tmp:
        for size, n in (((512, 512), args.n512), ((2048, 1536), args.n2048)):
            if n:
                rows += measure(f"{size[0]}x{size[1]} from AID", large_jpegs(Path(tmp), n, size), workers,
                                args.rounds, args.grid, args.max_side)
    text = table(["files", "pass", "workers", "n", "median s", "images/s", "x floor", "x floor, per round"], rows)
    print(text)
    body = (f"Real JPEG files (128 px AID and NWPU-12), and {args.n512} 512 x 512 and {args.n2048} 2048 x 1536 "
            f"JPEG tiles made from AID images (upscaled, noise added); page cache warm; DataLoader batches of 64 "
            f"(floor) and of up to 256 (the stage, as in the pipeline); entropy grid {args.grid}, "
            f"max_side {args.max_side}; {args.rounds} interleaved rounds, median. The floor reads each file and "
            f"runs PIL's full RGB decode; the stage reads, hashes, decodes the JPEG luma plane only (DCT-"
            f"shrunk toward max_side for large tiles), and scores. `x floor` = floor time / stage time at the "
            f"same worker count (target >= 0.8), from the medians; per round, the range of the same ratio.\n\n{text}")
    write_section("entropy_speed", "Entropy stage against raw decode", body)


if __name__ == "__main__":
    main()
