"""engine=ray against one process for the index + entropy pass and the embedding pass on real images.

`python benchmarks/ray_index.py [--n 2000] [--cpus 2] [--work /tmp/ray_index]`

The corpus: `--n` real NWPU images (the same number from each class, linked), one exact byte
copy of one of them and one truncated JPEG. One process runs prune/run.py's index and embedding
passes through their own functions (`index_inputs`, `embed_inputs`: `index.num_workers=2`
DataLoader workers, the default); then a local Ray cluster of `--cpus` CPUs runs the same with
engine=ray (shard scans, the hash shuffle, partitions, decode + encoder actor pool), each into
its own fresh cache. Reported: wall time per pass, the cluster's start apart, and whether the
index table and every store file are the same bytes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import DATA, table, write_section  # noqa: E402


def corpus(root: Path, n: int) -> Path:
    classes = sorted(p for p in (DATA / "nwpu12" / "train").iterdir() if p.is_dir())
    per = -(-n // len(classes))
    for c in classes:
        (root / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per]:
            (root / c.name / f.name).symlink_to(f)
    first = sorted((root / classes[0].name).iterdir())[0]
    shutil.copyfile(first, root / classes[-1].name / "copy.jpg")
    (root / classes[1].name / "truncated.jpg").write_bytes(first.resolve().read_bytes()[:300])
    return root


def passes(data: Path, cache: Path, engine) -> tuple[dict, pd.DataFrame, dict]:
    from prune.embed import embed_inputs
    from prune.index import index_inputs
    from prune.validate import validate
    from rsprune.cli import compose

    cfg = compose("prune", ["method=random", f"data.corpus=[{data}]", f"cache_dir={cache}", "report.enabled=false"])
    plan = validate(cfg)
    t = time.perf_counter()
    from prune.engine_ray_index import ray_index

    inputs = index_inputs(plan, cfg, str(cache), False, None, None if engine is None else ray_index)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    embed_inputs(inputs, cfg, str(cache), False, None, engine)
    t_embed = time.perf_counter() - t
    store = {p.name: p.read_bytes() for p in sorted((cache / "embed").glob("*/*.npy"))}
    return {"index": t_index, "embed": t_embed}, inputs.corpus, store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ray_index")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = corpus(work / "nwpu", args.n)
    one, idx1, store1 = passes(data, work / "one", None)

    from omegaconf import OmegaConf

    from prune.engine_ray import RayEngine, start_ray

    t = time.perf_counter()
    start_ray(OmegaConf.create({"address": None, "num_cpus": args.cpus, "object_store_gb": 1.0}))
    t_start = time.perf_counter() - t
    on_ray, idx2, store2 = passes(data, work / "ray", RayEngine(str(work / "ray")))
    same_index = idx1.equals(idx2)
    same_store = store1 == store2 and len(store1) > 0
    rows = [[k, one[k], on_ray[k], f"x{one[k] / on_ray[k]:.2f}"] for k in ("index", "embed")]
    rows.append(["index + embed", one["index"] + one["embed"], on_ray["index"] + on_ray["embed"],
                 f"x{(one['index'] + one['embed']) / (on_ray['index'] + on_ray['embed']):.2f}"])
    body = (f"{len(idx1)} files ({(~idx1.readable).sum()} unreadable, {(idx1.duplicate_of != '').sum()} exact "
            f"duplicate), {len(store1) // 2} embedding shards; a local Ray cluster of {args.cpus} CPUs, started in "
            f"{t_start:.1f} s (not in the table). Wall seconds, fresh caches, default config (`method=random`: no "
            "reference).\n\n" + table(["pass", "one process", "engine=ray", "speed vs one process"], rows)
            + f"\n\nSame index table: {same_index}; same store files (float16 bytes): {same_store}.")
    print(body)
    write_section("ray_index", "engine=ray index and embedding against one process (real images)", body)
    shutil.rmtree(work, ignore_errors=True)
    if not (same_index and same_store):
        sys.exit(1)


if __name__ == "__main__":
    main()
