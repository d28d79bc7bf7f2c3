"""Peak memory of a whole prune of a small corpus holding one large raster: 40 real AID images
plus one 6000 x 6000 4-band 16-bit zlib TIFF made from a real AID tile (bicubic upscale, the
green band repeated as a fourth band).

`python benchmarks/prune_memory.py [--side 6000] [--before DIR --before-name COMMIT]`

Each prune (`prune/run.py`, default config and method, report on, cold cache) runs in its own
process. `peak RSS MiB` is the largest process's peak resident memory (ru_maxrss from wait4:
the command or one of its decode workers, from a fresh wrapper process
per run); `tree MiB` the peak of the summed resident memory of
the command and its workers (sampled every 20 ms). Rows: this checkout with and without the
large TIFF (the baseline), and with `--before DIR` another checkout (e.g. `git archive` of the
commit before the fix, unpacked in DIR) on the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchutil import DATA, ROOT, table, write_section


def make_corpus(folder: Path, side: int, images: int = 40, big: bool = True) -> Path:
    """`images` AID files (links, one per class round-robin) and, with `big`, the large TIFF."""
    corpus = folder / ("corpus-big" if big else "corpus")
    classes = sorted(p for p in (DATA / "aid").iterdir() if p.is_dir())
    for i in range(images):
        cls = classes[i % len(classes)]
        (corpus / cls.name).mkdir(parents=True, exist_ok=True)
        src = sorted(cls.iterdir())[i // len(classes)]
        (corpus / cls.name / src.name).symlink_to(src)
    if big:
        import tifffile
        from PIL import Image

        tile = sorted((DATA / "aid" / "Farmland").iterdir())[0]
        rgb = np.asarray(Image.open(tile).convert("RGB").resize((side, side), Image.BICUBIC))
        a = np.empty((side, side, 4), np.uint16)
        a[..., :3] = rgb.astype(np.uint16) * 257
        a[..., 3] = a[..., 1]
        del rgb
        (corpus / "large").mkdir()
        tifffile.imwrite(corpus / "large" / "scene.tif", a, compression="zlib", predictor=True)
    return corpus


def reference(folder: Path, per_class: int = 3) -> Path:
    ref = folder / "reference"
    for cls in sorted(p for p in (DATA / "aid").iterdir() if p.is_dir()):
        (ref / cls.name).mkdir(parents=True)
        for src in sorted(cls.iterdir())[-per_class:]:  # the last files: none of them in the corpus
            (ref / cls.name / src.name).symlink_to(src)
    return ref


WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""


def _tree_rss(pid: int) -> float:
    """Summed VmRSS (MiB) of a process and its children."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return total


def measure(corpus: Path, ref: Path, work: Path, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(code / "prune" / "run.py"), f"data.corpus=[{corpus}]", f"data.reference={ref}",
           f"data.test={ref}", f"run_dir={work / 'run'}", f"cache_dir={work / 'cache'}", f"data.split.dir={work / 'split'}"]
    work.mkdir(parents=True)
    # A fresh wrapper per run: its RUSAGE_CHILDREN ru_maxrss is this prune's largest process alone.
    wrap = [sys.executable, "-c", WRAPPER, str(work / "maxrss")] + cmd
    t = time.perf_counter()
    proc = subprocess.Popen(wrap, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = 0.0
    while proc.poll() is None:
        tree = max(tree, _tree_rss(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t
    _, err = proc.communicate()
    usage = proc.returncode == 0 and json.loads((work / "run" / "summary.json").read_text())
    peak = int((work / "maxrss").read_text()) / 1024 if (work / "maxrss").exists() else float("nan")
    if proc.returncode != 0:
        return dict(peak=float("nan"), tree=tree, wall=wall, embed=float("nan"), files=0,
                    error=err.strip().splitlines()[-1][:80])
    return dict(peak=peak, tree=tree, wall=wall, embed=usage["timings_s"].get("embed", float("nan")),
                files=usage["counts"]["files"], error="-")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--before", default=None, help="another checkout to measure on the same files")
    ap.add_argument("--before-name", default=None, help="what that checkout is (a commit), for the table")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = reference(tmp)
        plain, big = make_corpus(tmp, args.side, big=False), make_corpus(tmp, args.side)
        tif = big / "large" / "scene.tif"
        runs = [("this checkout", ROOT, plain), ("this checkout", ROOT, big)]
        if args.before:
            runs.append((f"before ({args.before_name or args.before})", Path(args.before), big))
        for label, code, corpus in runs:
            work = tmp / f"work-{len(rows)}"
            r = measure(corpus, ref, work, code)
            what = "40 AID" + (f" + {args.side}x{args.side} 4-band uint16 TIFF" if corpus == big else "")
            rows.append([what, label, r["files"], f"{r['peak']:.0f}", f"{r['tree']:.0f}", f"{r['embed']:.1f}",
                         f"{r['wall']:.0f}", r["error"]])
            print(rows[-1], flush=True)
        size = tif.stat().st_size / 2**20
    text = table(["corpus", "code", "files", "peak RSS MiB", "tree MiB", "embed s", "wall s", "error"], rows)
    print(text)
    body = (f"`prune/run.py` with the default config (method rsprune, encoder efficientnet_lite0, index "
            f"workers 2, report on), one thread, cold cache; reference: 3 AID images of each class. The large "
            f"file: a real AID Farmland tile upscaled (bicubic) to {args.side} x {args.side}, 16-bit, green "
            f"repeated as band 4, tifffile zlib with the horizontal predictor ({size:.1f} MiB on disk, "
            f"{args.side * args.side * 8 / 2**20:.0f} MiB decoded). `peak RSS MiB` = the largest process's peak "
            f"(ru_maxrss of the command and its workers, from a fresh wrapper process per run); "
            f"`tree MiB` = peak of the command's plus its workers' resident memory, sampled every 20 ms. "
            f"Target: under 2 GB with the large TIFF.\n\n{text}")
    write_section("prune_memory", "Whole prune with one large 16-bit raster", body)


if __name__ == "__main__":
    main()
