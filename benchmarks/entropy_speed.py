"""Entropy stage (index pass) throughput against the raw decode rate of the same files (the floor).

`python benchmarks/entropy_speed.py [--n 5000] [--workers 0,2] [--rounds 3]`

The stage is prune.index.scan: read bytes once -> sha1 (exact duplicates) -> decode -> grey ->
global and local entropy, in a DataLoader with workers. The floor is the same DataLoader doing
only read + decode (rsprune.imageio.load_array) of the same files. Rows run interleaved and
the median of the rounds counts. Target: stage / floor >= 0.8.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchutil import DATA, table, write_section
from prune.index import scan
from rsprune.imageio import list_images, load_array


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_array(self.paths[i], Path(self.paths[i]).read_bytes()).shape


def _as_list(batch):
    return batch


def decode_only(paths, workers: int) -> int:
    loader = torch.utils.data.DataLoader(_Decode(paths), batch_size=64, num_workers=workers, collate_fn=_as_list)
    return sum(len(b) for b in loader)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="files: AID and NWPU-12, spread over the sorted lists")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to time (config default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--max-side", type=int, default=512)
    args = ap.parse_args()
    files = [str(DATA / r / p) for r in ("aid", "nwpu12") for p in list_images(DATA / r)]
    paths = files[::max(1, len(files) // args.n)][:args.n]
    for p in paths:  # warm the page cache: both sides then read from memory
        Path(p).read_bytes()
    jobs = {}
    for w in [int(x) for x in args.workers.split(",")]:
        jobs[("decode (floor)", w)] = lambda w=w: decode_only(paths, w)
        jobs[("entropy stage (scan)", w)] = lambda w=w: len(scan(paths, args.grid, args.max_side, w))
    times = {k: [] for k in jobs}
    for r in range(args.rounds):
        for k, fn in jobs.items():
            t = time.perf_counter()
            assert fn() == len(paths)
            times[k].append(time.perf_counter() - t)
            print(f"round {r}: {k}: {times[k][-1]:.2f} s", flush=True)
    rows = []
    for (what, w), ts in times.items():
        floor = np.median(times[("decode (floor)", w)])
        rows.append([what, w, len(paths), float(np.median(ts)), len(paths) / float(np.median(ts)),
                     float(floor / np.median(ts))])
    text = table(["pass", "workers", "files", "median s", "images/s", "x floor"], rows)
    print(text)
    body = (f"{len(paths)} real JPEG files (128 px AID and NWPU-12), page cache warm, DataLoader batch 64, "
            f"entropy grid {args.grid}, max_side {args.max_side}; {args.rounds} interleaved rounds, median. "
            f"`x floor` = decode-only time / stage time at the same worker count (target >= 0.8).\n\n{text}")
    write_section("entropy_speed", "Entropy stage against raw decode (issue 4, item 1)", body)


if __name__ == "__main__":
    main()
