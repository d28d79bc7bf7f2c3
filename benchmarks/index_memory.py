"""Peak memory of the index pass on one large raster: a 6000 x 6000 4-band 16-bit zlib
GeoTIFF-like file against 8-bit files of the same size.

`python benchmarks/index_memory.py [--side 6000] [--before DIR --before-name COMMIT]`

Each file is indexed alone (prune.index.build_index, one process, no workers, default entropy
config) in a fresh Python process; `peak RSS MiB` is that process's peak resident memory
(VmHWM, reset after the imports), `index MiB` the peak's growth over the resident memory before
the pass. `--before DIR` also measures another checkout's code
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

# VmHWM (peak RSS of this process image) reset after the imports: ru_maxrss would carry the
# parent's high-water mark across fork + exec.
CHILD = """
import json, sys
from omegaconf import OmegaConf
from prune.index import build_index

def status(key):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key))

icfg = OmegaConf.create({"shard_size": 8, "num_workers": 0})
ecfg = OmegaConf.create({"grid": 4, "max_side": 512})
cfg = OmegaConf.create({"index": icfg, "entropy": ecfg})
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
try:
    df, _ = build_index([sys.argv[1]], icfg, ecfg, sys.argv[2], progress=False)
except TypeError:  # a checkout from before the index took its own config groups
    df, _ = build_index([sys.argv[1]], cfg, sys.argv[2], progress=False)
peak = status("VmHWM")
print(json.dumps([peak, peak - before, bool(df.readable[0]), df.error[0]]))
"""


def make_files(folder: Path, side: int) -> dict[str, Path]:
    """The rasters, each in its own folder (one corpus each). Smooth fields, zlib with the
    horizontal predictor: about 1 MiB on disk for 275 MiB of 16-bit pixels, as RS tiles of
    smooth scenes compress."""
    import tifffile
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base16 = np.stack([((np.sin(6 * x + k) * np.cos(4 * y - k) + 1) * 12000).astype(np.uint16) & ~np.uint16(15)
                       for k in range(4)], axis=2)
    del x, y
    out = {}
    for name, writer in (("tiff_uint16_4band_zlib",
                          lambda p: tifffile.imwrite(p, base16, compression="zlib", predictor=True)),
                         ("tiff_uint8_4band_zlib", lambda p: tifffile.imwrite(p, (base16 >> 8).astype(np.uint8),
                                                                              compression="zlib", predictor=True)),
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
    # cwd too: `python -c` puts the working folder first on sys.path.
    r = subprocess.run([sys.executable, "-c", CHILD, str(path.parent), str(cache)], capture_output=True,
                       text=True, env=env, cwd=code)
    if r.returncode != 0:  # the old code dies of memory under a cap: that is a result too
        return [float("nan"), float("nan"), False, r.stderr.strip().splitlines()[-1][:80]]
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--before", default=None, help="another checkout to measure on the same files")
    ap.add_argument("--before-name", default=None, help="what that checkout is (a commit), for the table")
    args = ap.parse_args()
    before = f"before ({args.before_name or args.before})"
    codes = [("this checkout", ROOT)] + ([(before, Path(args.before))] if args.before else [])
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
            f"peak resident memory during the pass (VmHWM reset after the imports; about 290 MiB are "
            f"resident before the pass); "
            f"`index MiB` = that peak minus the resident memory before the pass. The files: smooth fields, "
            f"4 bands (the JPEG: 3), written by tifffile (zlib, horizontal predictor) and PIL (quality 90).\n\n{text}")
    write_section("index_memory", "Index pass memory on a large 16-bit raster", body)


if __name__ == "__main__":
    main()
