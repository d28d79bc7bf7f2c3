"""Peak memory of the index pass on one large raster (issue 13): a 6000 x 6000 4-band 16-bit zlib
GeoTIFF-like file against 8-bit files of the same size.

`python benchmarks/index_memory.py [--side 6000] [--before DIR]`

Each file is indexed alone (prune.index.build_index, one process, no workers, default entropy
config) in a fresh Python process; `peak RSS MiB` is that process's ru_maxrss, `index MiB` its
growth during the pass (imports excluded). `--before DIR` also measures another checkout's code
(e.g. `git archive` of the commit before the fix, unpacked in DIR) on the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchutil import ROOT, table, write_section

CHILD = """
import json, resource, sys
from omegaconf import OmegaConf
from prune.index import build_index
icfg = OmegaConf.create({"shard_size": 8, "num_workers": 0})
ecfg = OmegaConf.create({"grid": 4, "max_side": 512})
cfg = OmegaConf.create({"index": icfg, "entropy": ecfg})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    df, _ = build_index([sys.argv[1]], icfg, ecfg, sys.argv[2], progress=False)
except TypeError:  # a checkout from before the index took its own config groups
    df, _ = build_index([sys.argv[1]], cfg, sys.argv[2], progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([peak / 1024, (peak - before) / 1024, bool(df.readable[0]), df.error[0]]))
"""


def make_files(folder: Path, side: int) -> dict[str, Path]:
    """The rasters, each in its own folder (one corpus each)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    # Smooth fields plus sparse texture: compresses like real imagery does (well), decodes to full size.
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([np.sin(6 * x + k) * np.cos(4 * y - k) for k in range(4)], axis=2)
    base16 = ((base + 1) * 12000).astype(np.uint16)
    base16[::97, :, 0] += rng.integers(0, 500, (len(range(0, side, 97)), side), dtype=np.uint16)
    out = {}
    for name, writer in (("tiff_uint16_4band_zlib", lambda p: tifffile.imwrite(p, base16, compression="zlib")),
                         ("tiff_uint8_4band_zlib",
                          lambda p: tifffile.imwrite(p, (base16 >> 8).astype(np.uint8), compression="zlib")),
                         ("jpeg_uint8_rgb", lambda p: Image.fromarray((base16[..., :3] >> 8).astype(np.uint8))
                          .save(p, quality=90))):
        d = folder / name
        d.mkdir()
        path = d / ("tile.jpg" if name.startswith("jpeg") else "tile.tif")
        writer(path)
        out[name] = path
    return out


def measure(path: Path, cache: Path, code: Path) -> list:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(path.parent), str(cache)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:  # the old code dies of memory under a cap: that is a result too
        return [float("nan"), float("nan"), False, r.stderr.strip().splitlines()[-1][:80]]
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--before", default=None, help="another checkout to measure on the same files")
    args = ap.parse_args()
    codes = [("this checkout", ROOT)] + ([(f"before ({args.before})", Path(args.before))] if args.before else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in make_files(Path(tmp), args.side).items():
            for label, code in codes:
                peak, grew, readable, error = measure(path, Path(tmp) / f"cache-{name}-{len(rows)}", code)
                rows.append([name, label, f"{path.stat().st_size / 2**20:.2f}", f"{peak:.0f}", f"{grew:.0f}",
                             readable, error or "-"])
    text = table(["file", "code", "size MiB", "peak RSS MiB", "index MiB", "readable", "error"], rows)
    print(text)
    body = (f"One {args.side} x {args.side} raster per corpus, indexed alone in a fresh process (build_index, "
            f"entropy grid 4, max_side 512, no DataLoader workers, one thread). `peak RSS MiB` = the process's "
            f"ru_maxrss (imports included); `index MiB` = its growth during the pass. The files: smooth fields "
            f"plus sparse texture, 4 bands (the JPEG: 3), written by tifffile (zlib) and PIL (quality 90).\n\n{text}")
    write_section("index_memory", "Index pass memory on a large 16-bit raster (issue 13)", body)


if __name__ == "__main__":
    main()
