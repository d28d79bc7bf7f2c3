"""Cost of the evaluation metric: feature extraction rate and the Fréchet distance computation.

`python benchmarks/eval_fd.py [--n 256] [--feature efficientnet_lite2] [--write]`

Rows: images/s of `extract_features` on real AID files (decode + antialiased resize + network)
at the encoder's resolution; then the Fréchet distance of two n-image feature sets by the three
routes in rsprune/frechet.py: torchmetrics (d x d eigvals, what eval/fid.py reports), the float64 d x d
eigh form (`frechet_distance` on statistics) and the sample-space form
(`frechet_distance_features`, for n small against d), with their relative disagreement.
`--write` replaces this script's section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

from benchutil import DATA, machine, table, write_section
from rsprune.features import build_extractor, extract_features
from rsprune.frechet import fd_kid, frechet_distance, frechet_distance_features, gaussian_stats
from rsprune.imageio import list_images


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--feature", default="efficientnet_lite2")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    rel = list_images(DATA / "aid")
    paths = [str(DATA / "aid" / r) for r in rel[:: max(1, len(rel) // (2 * a.n))][: 2 * a.n]]
    ex = build_extractor(a.feature)
    (f, _), t_feat = timed(extract_features, paths, ex, 64, 1)
    f1, f2 = f[0::2], f[1::2]
    tm, t_tm = timed(lambda: fd_kid(f1, f2)["fd"])
    ref, t_eigh = timed(lambda: frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2)))
    low, t_low = timed(frechet_distance_features, f1, f2)
    rows = [[f"extract {len(paths)} images ({a.feature}, {ex.resolution} px)", f"{t_feat:.1f}",
             f"{len(paths) / t_feat:.1f} img/s", ""],
            [f"FD torchmetrics (d={f.shape[1]}, n={len(f1)})", f"{t_tm:.2f}", f"{tm:.4f}", f"{abs(tm - ref) / ref:.1e}"],
            ["FD float64 eigh (statistics)", f"{t_eigh:.2f}", f"{ref:.4f}", "reference"],
            ["FD float64 sample space (features)", f"{t_low:.2f}", f"{low:.4f}", f"{abs(low - ref) / ref:.1e}"]]
    body = table(["what", "seconds", "value", "rel. diff"], rows)
    print(machine())
    print(body)
    if a.write:
        write_section("eval_fd", "Evaluation metric cost", body)


if __name__ == "__main__":
    main()
