"""The main command cold (empty cache) and warm (same command again), end to end.

    python benchmarks/pipeline.py [--experiment ratio85] [--shared]

Runs `python prune/run.py +experiment=...` twice in subprocesses with a fresh cache folder and
writes the `pipeline` section of BENCHMARKS.md: wall time, peak RSS and per-stage timings.
Targets: cold <= 10 min, warm <= 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import ROOT, table, write_section


def timed_run(experiment: str, cache: Path, run_dir: Path) -> tuple[float, float, dict]:
    cmd = [sys.executable, str(ROOT / "prune" / "run.py"), f"+experiment={experiment}", f"cache_dir={cache}",
           f"run_dir={run_dir}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rss = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 2**20  # GiB
    return wall, rss, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="ratio85")
    ap.add_argument("--shared", action="store_true", help="say that other jobs shared the machine")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rsprune-bench-") as tmp:
        tmp = Path(tmp)
        rows = []
        for name in ("cold", "warm"):
            wall, rss, s = timed_run(args.experiment, tmp / "cache", tmp / name)
            st = s["timings_s"]
            rows.append([name, f"{wall:.1f}", f"{rss:.2f}"] + [f"{st.get(k, 0):.1f}" for k in
                                                                 ("index", "embed", "scenes", "clusters", "select")])
            print(rows[-1], flush=True)
        same = (tmp / "cold" / "kept.txt").read_bytes() == (tmp / "warm" / "kept.txt").read_bytes()
    c = s["counts"]
    enc = s["config"]["encoder"]
    body = (f"Default data: {c['files']} files (the default split's corpus: AID outside the reference + nwpu12/train, "
            f"test split excluded), reference: the split's 2,000 AID images; budget {c['budget']}. "
            f"Encoder {enc.get('variant', enc.get('model'))} at {enc['resolution']} px, backend "
            f"{enc.get('backend', 'eager')}. Cold = empty cache; warm = the same command again. Wall time includes "
            f"Python start-up and the report figures. Targets: cold <= 600 s, warm <= 60 s.\n\n"
            + table(["run", "wall s", "peak RSS GiB", "index s", "embed s", "scenes s", "clusters s", "select s"], rows)
            + f"\n\nwarm / cold wall time: {float(rows[1][1]) / float(rows[0][1]):.3f}; kept.txt identical: {same}.")
    write_section("pipeline", f"Main command cold and warm (`prune/run.py +experiment={args.experiment}`)", body,
                  shared_note=True if args.shared else None)


if __name__ == "__main__":
    main()
